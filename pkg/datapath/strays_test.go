package datapath_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/crashpoint"
	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// setChildEnv makes the test binary a child that runs Create on the
// directory it names, then SetServices with the JSON services of
// setChildServicesEnv: a writer the crash point may kill in the set.
const (
	setChildEnv         = "CTLB_TEST_SET_DIR"
	setChildServicesEnv = "CTLB_TEST_SET_SERVICES"
)

func runSetIfChild() {
	dir := os.Getenv(setChildEnv)
	if dir == "" {
		return
	}
	var svcs []datapath.Service
	if err := json.Unmarshal([]byte(os.Getenv(setChildServicesEnv)), &svcs); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	dp, err := datapath.Create(dir)
	if err == nil {
		err = dp.SetServices(svcs)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	dp.Close()
	os.Exit(0)
}

// setKilledAt runs Create and SetServices(svcs) in a child with the crash
// point armed, and fails unless the child died of it.
func setKilledAt(t *testing.T, dir, point string, svcs ...datapath.Service) {
	t.Helper()
	b, err := json.Marshal(svcs)
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command(os.Args[0], "-test.run=^$")
	c.Env = append(os.Environ(), setChildEnv+"="+dir, setChildServicesEnv+"="+string(b), crashpoint.Env+"="+point)
	out, err := c.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || !ee.Sys().(syscall.WaitStatus).Signaled() {
		t.Fatalf("set with crash point %s: %v, want it killed there; output:\n%s", point, err, out)
	}
}

// TestCrashDuringSetLeaksNoSlots: a writer killed in a set leaves slots
// given out that no VIP's current set names: those of a new VIP whose set
// was built but never swapped in (set-prepared), and the slot of a server
// that left a set that was swapped in (set-swapped, before the retire).
// The next writer's Create retires them; each is given out again once no
// socket holds it, the one with open connections only after they close.
// The slots of the current sets are untouched throughout.
func TestCrashDuringSetLeaksNoSlots(t *testing.T) {
	dp, netns, cg := attached(t, "strays")
	dir := dp.Dir()
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	c := datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")}
	a := datapath.Service{VIP: netip.MustParseAddrPort("198.18.100.2:80"), Servers: aps(t, "127.0.0.21:80", "127.0.0.22:80")}
	if err := dp.SetServices([]datapath.Service{c, a}); err != nil {
		t.Fatal(err)
	}
	client := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 4})
	if r := client.Result(t); r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 2, "127.0.0.12:9001": 2})
	live := map[string]uint32{} // "VIP server" -> slot, of the sets that stay
	for k, s := range statsBy(t, dp) {
		live[k] = s.Slot
	}

	// 127.0.0.11 leaves the VIP's set, which is swapped in; the writer
	// dies before it retires the slot (whose sockets stay open).
	c2 := c
	c2.Servers = aps(t, "127.0.0.12:9001")
	setKilledAt(t, dir, crashpoint.SetSwapped, c2)
	left := c.Key().String() + " 127.0.0.11:9001"
	delete(live, left)
	// A new VIP's set is built, never swapped in.
	b := datapath.Service{VIP: netip.MustParseAddrPort("198.18.100.3:80"), Servers: aps(t, "127.0.0.31:80", "127.0.0.32:80", "127.0.0.33:80")}
	setKilledAt(t, dir, crashpoint.SetPrepared, b)

	// What the crashes left, as a reader (no writer) sees it: B's slots
	// given out, and B in no map.
	reader, err := datapath.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if _, ok, err := reader.ServiceOf(b.Key()); err != nil || ok {
		t.Fatalf("VIP %s after the crash in its first set: listed %v (%v), want not", b.Key(), ok, err)
	}
	leaked := map[string]uint32{}
	for k, s := range statsBy(t, reader) {
		if s.VIP == b.VIP {
			leaked[k] = s.Slot
		}
	}
	if len(leaked) != 3 {
		t.Fatalf("slots of %s after the crash: %v, want its 3 servers' (the crash does not leave them)", b.Key(), leaked)
	}

	// The restarted writer.
	again, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if n := again.StraySlots(); n != 3 {
		t.Errorf("StraySlots = %d, want 3 (the new VIP's)", n)
	}
	check := func(when string, wantLeft bool, leftOpen int64) map[string]datapath.ServerStats {
		t.Helper()
		st := statsBy(t, again)
		for k, slot := range live {
			if s, ok := st[k]; !ok || s.Retired || s.Slot != slot {
				t.Errorf("%s: live %s: %+v (listed %v), want slot %d, not retired", when, k, s, ok, slot)
			}
		}
		for k := range leaked {
			// Retired, or given back already (when the grace passed).
			if s, ok := st[k]; ok && !s.Retired {
				t.Errorf("%s: stray %s: %+v, want it retired", when, k, s)
			}
		}
		s, ok := st[left]
		if ok != wantLeft || ok && (!s.Retired || s.Open != leftOpen) {
			t.Errorf("%s: %s (left the set, sockets open: %d): %+v (listed %v), want listed %v, retired", when, left, leftOpen, s, ok, wantLeft)
		}
		return st
	}
	check("after the restart", true, 2)
	time.Sleep(1100 * time.Millisecond) // the grace before a retired slot is given back
	st := check("after the grace", true, 2)
	for k := range leaked {
		if _, ok := st[k]; ok {
			t.Errorf("after the grace: stray %s (no socket) still held", k)
		}
	}
	client.Stop(t)
	assertOpen(t, again, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})
	time.Sleep(1100 * time.Millisecond)
	check("after its sockets closed", false, 0)

	// The slots given back serve a new VIP.
	top := uint32(0)
	for _, s := range live {
		top = max(top, s)
	}
	for _, s := range leaked {
		top = max(top, s)
	}
	d := datapath.Service{VIP: netip.MustParseAddrPort("198.18.100.4:80"), Servers: aps(t, "127.0.0.41:80", "127.0.0.42:80", "127.0.0.43:80", "127.0.0.44:80")}
	if err := again.SetService(d); err != nil {
		t.Fatal(err)
	}
	for k, s := range statsBy(t, again) {
		if s.VIP == d.VIP && s.Slot > top {
			t.Errorf("new VIP: %s got slot %d, above every slot given out before (%d): the freed ones were not reused", k, s.Slot, top)
		}
	}
}
