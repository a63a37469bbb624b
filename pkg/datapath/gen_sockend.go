package datapath

// The socket-termination programs (bpf/sockend.c) are a collection of their
// own: ctlbd loads them only to end sockets, against the pinned maps.
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" sockend ../../bpf/sockend.c
