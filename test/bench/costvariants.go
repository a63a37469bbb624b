package main

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu -DCTLB_BENCH_VARIANTS" costvariants ../../bpf/ctlb.c

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// costFeature is one row made of the variant programs the benchmark builds
// from bpf/ctlb.c with CTLB_BENCH_VARIANTS (costvariants_bpfel.o, never
// shipped). The first row attaches programs that do nothing to the hooks
// ctlb uses: the kernel's dispatch alone, the floor under any program set.
// Then each connect4 variant does one feature more than the one before it,
// on ctlb's own maps, so the difference between rows is what that feature
// costs per connect (except "+socket state", which keeps the state where
// "+socket storage" does, in the socket table: the two rows side by side are
// the table's gain). The next row, connect4 as ctlb ships it, adds the open
// count.
type costFeature struct {
	row   string
	progs []costAttach
	desc  string
	// direct: the row dials the servers, since nothing in it rewrites
	// the VIP. floor: the row is the hooks' floor, measured with more
	// pairs.
	direct, floor bool
}

// costAttach is one variant program and the hook it is attached to.
type costAttach struct {
	prog   string
	attach ebpf.AttachType
}

func connect4Variant(prog string) []costAttach {
	return []costAttach{{prog, ebpf.AttachCGroupInet4Connect}}
}

var costFeatures = []costFeature{
	{"hooks alone", []costAttach{
		{"ctlb_connect4_empty", ebpf.AttachCGroupInet4Connect},
		{"ctlb_getpeername4_empty", ebpf.AttachCgroupInet4GetPeername},
		{"ctlb_sock_ops_empty", ebpf.AttachCGroupSockOps},
	}, "connect4, getpeername4 and sock_ops programs that only return: the kernel's dispatch of the hooks (sock_ops runs 5 times per connect), dialing the servers", true, true},
	{"connect4 rewrite", connect4Variant("ctlb_connect4_rewrite"), "connect4 variant: VIP lookup, round-robin, rewrite, nothing else", false, false},
	{"+attempts", connect4Variant("ctlb_connect4_count"), "connect4 variant: and the attempts counter (per CPU)", false, false},
	{"+socket storage", connect4Variant("ctlb_connect4_storage"), "connect4 variant: and the socket's state in socket storage (allocated, freed with the socket: ctlb before the socket table)", false, false},
	{"+socket state", connect4Variant("ctlb_connect4_state"), "connect4 variant: the state in the socket table instead (an entry taken and given back)", false, false},
}

// costVariants loads the variant programs once, with the pinned maps in
// place of their own.
func (e *env) costVariants() (costVariantProgs, error) {
	if e.variants != nil {
		return e.variants, nil
	}
	spec, err := loadCostvariants()
	if err != nil {
		return nil, fmt.Errorf("load the connect4 variants' spec: %w", err)
	}
	want := map[string]bool{}
	for _, f := range costFeatures {
		for _, a := range f.progs {
			want[a.prog] = true
		}
	}
	for name := range spec.Programs {
		if !want[name] {
			delete(spec.Programs, name)
		}
	}
	repl := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		if m, ok := e.dp.Map(name); ok {
			repl[name] = m
		} else {
			delete(spec.Maps, name) // upgrade-only maps no variant uses
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		return nil, fmt.Errorf("load the connect4 variants: %w", err)
	}
	e.u.Push("connect4 variants", func() error { coll.Close(); return nil })
	e.variants = coll.Programs
	return e.variants, nil
}

// variantCgroup makes a cgroup with a row's variant programs attached.
func (e *env) variantCgroup(f costFeature) (string, error) {
	progs, err := e.costVariants()
	if err != nil {
		return "", err
	}
	cg, err := e.cgroup("cost-" + f.progs[0].prog)
	if err != nil {
		return "", err
	}
	for _, a := range f.progs {
		prog := progs[a.prog]
		if prog == nil {
			return "", fmt.Errorf("variant %s missing from costvariants_bpfel.o", a.prog)
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: a.attach, Program: prog})
		if err != nil {
			return "", fmt.Errorf("attach %s to %s: %w", a.prog, cg, err)
		}
		e.u.Push("cost link "+a.prog+" "+cg, l.Close)
	}
	return cg, nil
}

// costVariantProgs are the loaded variants by program name.
type costVariantProgs map[string]*ebpf.Program
