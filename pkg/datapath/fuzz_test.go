package datapath_test

import (
	"testing"

	"github.com/ctlb/ctlb/pkg/datapath"
)

// FuzzParseAddrPort: the VIP and server parsers never panic, and whatever
// they accept is a dialable unicast IPv4 address with a real port that
// prints back to a form they accept again.
func FuzzParseAddrPort(f *testing.F) {
	for _, s := range []string{"198.19.0.1:8502", "127.0.0.1:1", "0.0.0.0:80", "255.255.255.255:65535",
		"[::1]:80", "[::ffff:1.2.3.4]:80", "1.2.3.4:65536", "1.2.3.4", "1.2.3.4:0", "01.2.3.4:80", "1.2.3.4:+80", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, parse := range []func(string) (string, error){
			func(s string) (string, error) { ap, err := datapath.ParseVIP(s); return ap.String(), err },
			func(s string) (string, error) { ap, err := datapath.ParseServer(s); return ap.String(), err },
		} {
			out, err := parse(s)
			if err != nil {
				if err.Error() == "" {
					t.Fatal("empty error")
				}
				continue
			}
			again, err := parse(out)
			if err != nil || again != out {
				t.Fatalf("%q parsed to %q, which parses to %q, %v", s, out, again, err)
			}
		}
	})
}
