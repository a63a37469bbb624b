package main

import (
	"fmt"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// cgroupNSEnv marks a ctlbd that already moved to the host's cgroup
// namespace (or must not try): set on the re-executed process.
const cgroupNSEnv = "CTLB_HOST_CGROUPNS"

// joinHostCgroupNS puts ctlbd in the host's cgroup namespace when it runs in
// a private one, as an unprivileged container on a cgroup v2 host does. In
// a private namespace /proc/PID/cgroup of every process outside it reads
// "/../../..", so the search for a sandbox's pod cgroup through its
// processes finds nothing, and the cgroup v2 mount's root reads "/.." in
// mountinfo. With the host's PID namespace (hostPID), PID 1 is the host's
// init and /proc/1/ns/cgroup (hostNS, --host-cgroupns) the host's cgroup
// namespace.
//
// setns changes only the calling thread, and a Go process has several: so
// the thread joins the namespace and then execs ctlbd again, which keeps
// that thread's namespaces (and the PID). It needs CAP_SYS_ADMIN and
// CAP_SYS_PTRACE, which ctlbd has; when anything fails, ctlbd goes on
// where it is, and says why. It returns only when no exec happened.
func joinHostCgroupNS(hostNS string) (note string) {
	if hostNS == "" {
		return ""
	}
	if v := os.Getenv(cgroupNSEnv); v != "" {
		if v == "joined" {
			return "joined the host's cgroup namespace"
		}
		return ""
	}
	self, err := os.Readlink("/proc/self/ns/cgroup")
	if err != nil {
		return ""
	}
	f, err := os.Open(hostNS)
	if err != nil {
		if self == "cgroup:[4026531835]" { // the initial namespace: nothing to join
			return ""
		}
		return fmt.Sprintf("in a private cgroup namespace and cannot open the host's (%v): pod cgroups are not found through sandbox processes", err)
	}
	defer f.Close()
	if host, err := os.Readlink(hostNS); err == nil && host == self {
		return "" // in it already
	}
	runtime.LockOSThread()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWCGROUP); err != nil {
		runtime.UnlockOSThread()
		return fmt.Sprintf("in a private cgroup namespace and cannot join the host's (%v): pod cgroups are not found through sandbox processes", err)
	}
	env := append(os.Environ(), cgroupNSEnv+"=joined")
	err = syscall.Exec("/proc/self/exe", os.Args, env)
	// Still here: the exec failed, and only this thread is in the host's
	// namespace. Nothing else ran yet; say so and go on.
	runtime.UnlockOSThread()
	return fmt.Sprintf("joined the host's cgroup namespace but could not re-execute (%v)", err)
}
