# Draws the benchmark's paths side by side (make bench-plot).
#   gnuplot -e "datafile='bench/results.dat'; outfile='docs/bench.png'" hack/bench-plot.gnuplot
# The data file is written by the benchmark (test/bench): one line per path,
#   name conns/s_1 conns/s_N p50_us p99_us gbps_1 gbps_N cpu_us_per_conn sys_cpu_us_per_conn
# then, as a second data set (index 1, not drawn), the every-client rows.

if (!exists("datafile")) datafile = 'bench/results.dat'
if (!exists("outfile")) outfile = 'docs/bench.png'

set terminal pngcairo size 1400,1000 font "sans,10"
set output outfile

set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key outside top center horizontal
set xtics rotate by -30 scale 0
set yrange [0:*]

set multiplot layout 2,2 title "ctlb benchmark: every path in one run (medians over interleaved rounds)" font "sans,13"

set title "Connections per second (connect, 64 B request/response, close)"
set ylabel "conn/s"
plot datafile index 0 using 2:xtic(1) title "1 client" lc rgb "#4e79a7", \
     '' index 0 using 3 title "many clients" lc rgb "#f28e2b"

set title "Bulk throughput"
set ylabel "Gbit/s"
plot datafile index 0 using 6:xtic(1) title "1 stream" lc rgb "#4e79a7", \
     '' index 0 using 7 title "several streams" lc rgb "#f28e2b"

set title "Request/response latency on a kept connection"
set ylabel "microseconds"
plot datafile index 0 using 4:xtic(1) title "p50" lc rgb "#59a14f", \
     '' index 0 using 5 title "p99" lc rgb "#e15759"

set title "CPU time per connection (1 client)"
set ylabel "microseconds"
plot datafile index 0 using 8:xtic(1) title "client + server + proxy cgroups" lc rgb "#76b7b2", \
     '' index 0 using 9 title "whole machine (incl. softirq)" lc rgb "#b07aa1"

unset multiplot
