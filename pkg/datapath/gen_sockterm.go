package datapath

// The socket-termination programs (bpf/sockterm.c) are a collection of their
// own: ctlbd loads them only to end sockets, against the pinned socket storage.
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" sockterm ../../bpf/sockterm.c
