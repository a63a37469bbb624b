package main

//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu -DCTLB_BENCH_VARIANTS" costvariants ../../bpf/ctlb.c

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// costFeature is one of the connect4 variants the benchmark builds from
// bpf/ctlb.c with CTLB_BENCH_VARIANTS (costvariants_bpfel.o, never shipped):
// each does one feature more than the one before it, on ctlb's own maps, so
// the difference between rows is what that feature costs per connect
// (except "+socket state", which keeps the state where "+socket storage"
// does, in the socket table: the two rows side by side are the table's
// gain). The next row, connect4 as ctlb ships it, adds the open count.
type costFeature struct {
	row, prog, desc string
}

var costFeatures = []costFeature{
	{"connect4 rewrite", "ctlb_connect4_rewrite", "connect4 variant: VIP lookup, round-robin, rewrite, nothing else"},
	{"+attempts", "ctlb_connect4_count", "connect4 variant: and the attempts counter (per CPU)"},
	{"+socket storage", "ctlb_connect4_storage", "connect4 variant: and the socket's state in socket storage (allocated, freed with the socket: ctlb before the socket table)"},
	{"+socket state", "ctlb_connect4_state", "connect4 variant: the state in the socket table instead (an entry taken and given back)"},
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
		want[f.prog] = true
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

// variantCgroup makes a cgroup with one connect4 variant attached.
func (e *env) variantCgroup(f costFeature) (string, error) {
	progs, err := e.costVariants()
	if err != nil {
		return "", err
	}
	prog := progs[f.prog]
	if prog == nil {
		return "", fmt.Errorf("connect4 variant %s missing from costvariants_bpfel.o", f.prog)
	}
	cg, err := e.cgroup("cost-" + f.prog)
	if err != nil {
		return "", err
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	if err != nil {
		return "", fmt.Errorf("attach %s to %s: %w", f.prog, cg, err)
	}
	e.u.Push("cost link "+f.prog+" "+cg, l.Close)
	return cg, nil
}

// costVariantProgs are the loaded variants by program name.
type costVariantProgs map[string]*ebpf.Program
