package steering

// The generated objects are committed so that `go build` needs no clang;
// `make generate` reruns this and CI checks that the result is current.
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" steer ../../bpf/steer.c
