package datapath_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ctlb/ctlb/internal/testutil"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// The socket table's entry (bpf/ctlb.h, struct sock_entry_v2): the owner's
// cookie, then its sock_state_v2, whose slot is at byte 40.
const (
	socktabEntries   = 65536
	socktabEntrySize = 64
	entrySlotOffset  = 8 + 40
)

// takenEntries reads the socket table: the slot of every entry a socket
// holds (cookie != 0), by cookie.
func takenEntries(t *testing.T, dp *datapath.Datapath) map[uint64]uint32 {
	t.Helper()
	m, ok := dp.Map("ctlb_socktab_v2")
	if !ok {
		t.Fatal("ctlb_socktab_v2 is not open")
	}
	if m.MaxEntries() != socktabEntries || m.ValueSize() != socktabEntrySize {
		t.Fatalf("socket table: %d entries of %d bytes, want %d of %d", m.MaxEntries(), m.ValueSize(), socktabEntries, socktabEntrySize)
	}
	out := map[uint64]uint32{}
	var k uint32
	v := make([]byte, socktabEntrySize)
	it := m.Iterate()
	for it.Next(&k, &v) {
		if c := binary.LittleEndian.Uint64(v); c != 0 {
			out[c] = binary.LittleEndian.Uint32(v[entrySlotOffset:])
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func waitTaken(t *testing.T, dp *datapath.Datapath, want int) map[uint64]uint32 {
	t.Helper()
	var got map[uint64]uint32
	testutil.Eventually(t, "socket table entries", 5*time.Second, func() (bool, string) {
		got = takenEntries(t, dp)
		return len(got) == want, fmt.Sprintf("%d taken, want %d: %v", len(got), want, got)
	})
	return got
}

// slotsBy maps server address -> slot, from the stats.
func slotsBy(t *testing.T, dp *datapath.Datapath) map[uint32]string {
	t.Helper()
	out := map[uint32]string{}
	for _, s := range statsBy(t, dp) {
		out[s.Slot] = s.Server.String()
	}
	return out
}

// twoServerVIP is an attached cgroup and the VIP with two live servers.
func twoServerVIP(t *testing.T, id string) (*datapath.Datapath, ns.NetNS, string) {
	t.Helper()
	dp, netns, cg := attached(t, id)
	testutil.AddLoopbackAddrs(t, netns, "127.0.0.11", "127.0.0.12")
	testutil.StartServers(t, netns, "127.0.0.11:9001", "127.0.0.12:9001")
	if err := dp.SetService(datapath.Service{VIP: netip.MustParseAddrPort(vip), Servers: aps(t, "127.0.0.11:9001", "127.0.0.12:9001")}); err != nil {
		t.Fatal(err)
	}
	return dp, netns, cg
}

// TestSocketTable: a VIP socket's state is an entry of the socket table,
// keyed by its cookie and naming its server's slot (no socket storage is
// allocated); getpeername reads it back as the VIP; the root's
// sock_release gives the entry and the open count back.
func TestSocketTable(t *testing.T) {
	dp, netns, cg := twoServerVIP(t, "socktab")
	if n := len(takenEntries(t, dp)); n != 0 {
		t.Fatalf("%d entries taken before any VIP socket", n)
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 4})
	r := c.Result(t)
	if r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	for i, p := range r.Peers {
		if p != vip {
			t.Errorf("connection %d: getpeername %s, want the VIP %s", i, p, vip)
		}
	}
	taken := waitTaken(t, dp, 4)
	if st, ok, err := dp.SocketTable(); err != nil || !ok || st.Used != 4 || st.Size != socktabEntries {
		t.Errorf("SocketTable() = %+v, %v, %v; want 4 of %d used", st, ok, err, socktabEntries)
	}
	slots := slotsBy(t, dp)
	per := map[string]int{}
	for cookie, slot := range taken {
		if slots[slot] == "" {
			t.Errorf("entry of cookie %d names slot %d, no server's (%v)", cookie, slot, slots)
		}
		per[slots[slot]]++
	}
	if per["127.0.0.11:9001"] != 2 || per["127.0.0.12:9001"] != 2 {
		t.Errorf("entries per server %v, want 2 each", per)
	}
	for k, s := range statsBy(t, dp) {
		if s.Established != 2 {
			t.Errorf("%s: %d established, want 2 (sock_ops reads the entry)", k, s.Established)
		}
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 2, "127.0.0.12:9001": 2})
	c.Stop(t)
	waitTaken(t, dp, 0)
	if st, _, err := dp.SocketTable(); err != nil || st.Used != 0 {
		t.Errorf("after the client: SocketTable() = %+v, %v; want none used", st, err)
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})
}

// TestSocketTableTakenFallsBackToStorage: when a socket's entry belongs to
// another socket (here: every entry, to sockets that do not exist), its
// state goes to socket storage, and every feature reading it still works:
// getpeername, sock_ops' established count, the open count given back at
// release. The other sockets' entries are left alone.
func TestSocketTableTakenFallsBackToStorage(t *testing.T) {
	dp, netns, cg := twoServerVIP(t, "socktab-full")
	m, _ := dp.Map("ctlb_socktab_v2")
	const fake = uint64(1) << 62 // no socket's cookie: they count up from 1
	keys := make([]uint32, socktabEntries)
	vals := make([][socktabEntrySize]byte, socktabEntries)
	for i := range keys {
		keys[i] = uint32(i)
		binary.LittleEndian.PutUint64(vals[i][:], fake+uint64(i))
	}
	if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatalf("fill the socket table: %v", err)
	}
	if st, _, err := dp.SocketTable(); err != nil || st.Used != socktabEntries {
		t.Fatalf("filled: SocketTable() = %+v, %v; want all %d used", st, err, socktabEntries)
	}
	c := testutil.StartClient(t, netns, cg, testutil.ClientSpec{Mode: "hold", Target: vip, Count: 4})
	r := c.Result(t)
	if r.Failed != 0 {
		t.Fatalf("connects failed: %v", r.Errors)
	}
	assertSplit(t, "hold", r.Landed, []string{"127.0.0.11:9001", "127.0.0.12:9001"})
	for i, p := range r.Peers {
		if p != vip {
			t.Errorf("connection %d: getpeername %s, want the VIP %s (state in socket storage)", i, p, vip)
		}
	}
	for k, s := range statsBy(t, dp) {
		if s.Established != 2 {
			t.Errorf("%s: %d established, want 2 (sock_ops reads the storage)", k, s.Established)
		}
	}
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 2, "127.0.0.12:9001": 2})
	c.Stop(t)
	assertOpen(t, dp, map[string]int64{"127.0.0.11:9001": 0, "127.0.0.12:9001": 0})
	taken := takenEntries(t, dp)
	if len(taken) != socktabEntries {
		t.Fatalf("%d entries taken after the client, want all %d still the others'", len(taken), socktabEntries)
	}
	for i := range socktabEntries {
		if _, ok := taken[fake+uint64(i)]; !ok {
			t.Fatalf("entry %d is no longer its owner's", i)
		}
	}
}

// TestOpenWithoutSocketTable: pins made by a ctlbd of layout 2 from before
// the socket table (its programs keep all state in socket storage) are
// opened as they are, by tools and by the plugin's ADD, which is installed
// before the new ctlbd starts. Any other missing map is still refused.
func TestOpenWithoutSocketTable(t *testing.T) {
	dir := filepath.Join(testutil.MountBPFFS(t), "ctlb")
	dp, err := datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()
	if err := os.Remove(filepath.Join(dir, "ctlb_socktab_v2")); err != nil {
		t.Fatal(err)
	}
	for name, open := range map[string]func(string) (*datapath.Datapath, error){"Open": datapath.Open, "OpenForAttach": datapath.OpenForAttach} {
		d, err := open(dir)
		if err != nil {
			t.Fatalf("%s without the socket table: %v", name, err)
		}
		if _, ok := d.Map("ctlb_socktab_v2"); ok {
			t.Errorf("%s: the socket table is open, but not pinned", name)
		}
		if name == "Open" {
			if st, ok, err := d.SocketTable(); ok || err != nil {
				t.Errorf("SocketTable() without the table = %+v, %v, %v; want not ok, no error", st, ok, err)
			}
		}
		d.Close()
	}
	if err := os.Remove(filepath.Join(dir, "ctlb_socks_v2")); err != nil {
		t.Fatal(err)
	}
	if _, err := datapath.Open(dir); !errors.Is(err, datapath.ErrNotPinned) {
		t.Fatalf("Open without ctlb_socks_v2: %v, want ErrNotPinned", err)
	}
	// ctlbd takes both back from the programs that use them.
	dp, err = datapath.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	for _, n := range []string{"ctlb_socktab_v2", "ctlb_socks_v2"} {
		if _, err := os.Lstat(filepath.Join(dir, n)); err != nil {
			t.Errorf("after Create: %v", err)
		}
	}
}
