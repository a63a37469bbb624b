package ctlbd_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ctlb/ctlb/internal/testutil"
)

// TestExecCandidatesCleaned: the real ctlbd with an exec source that
// prints 0.0.0.0:18080, an IPv6 server, a duplicate and 1,100 candidates
// (3 live servers, the rest refusing) for one VIP. The bad entries are left
// out with reasons in status, the candidates over the per-VIP limit are
// trimmed, and the map still follows health: a server that dies leaves
// the map, and comes back. One bad candidate never freezes the set.
func TestExecCandidatesCleaned(t *testing.T) {
	live := []string{"127.0.0.51:8502", "127.0.0.52:8502", "127.0.0.53:8502"}
	lines := append([]string{"0.0.0.0:18080", "[2001:2::7]:8502", live[0]}, live...)
	for i := 0; len(lines) < 1100+3; i++ {
		lines = append(lines, fmt.Sprintf("127.0.%d.%d:8502", 2+i/250, 1+i%250))
	}
	list := filepath.Join(t.TempDir(), "servers.txt")
	if err := os.WriteFile(list, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	n := newNode(t, []string{"127.0.0.51", "127.0.0.52", "127.0.0.53"}, fmt.Sprintf(`{
		"metrics": "127.0.0.1:9464",
		"services": [{"vip": %q, "exec": {"command": ["/bin/cat", %q], "interval": "2s", "timeout": "2s"},
		              "health": {"interval": "1s", "timeout": "500ms", "rise": 1}}]}`, vip, list))
	started := testutil.StartServers(t, n.netns, live...)
	n.start()
	took := n.waitSet(vip, live, 15*time.Second)
	t.Logf("1,103 entries in, the 3 live servers in the map after %v", took)

	st := n.status(vip)
	if len(st.Sources) != 1 {
		t.Fatalf("sources %+v", st.Sources)
	}
	src := st.Sources[0]
	t.Logf("source status: %d servers, %d rejected, first %+v; trimmed %d", src.Servers, src.Rejected, src.RejectedFirst, st.Trimmed)
	if src.Rejected != 3 {
		t.Errorf("rejected %d entries, want 3 (0.0.0.0:18080, the IPv6 one, the duplicate): %+v", src.Rejected, src.RejectedFirst)
	}
	if st.Trimmed != 1100-1024 {
		t.Errorf("trimmed %d, want %d", st.Trimmed, 1100-1024)
	}
	reasons := map[string]string{}
	for _, r := range src.RejectedFirst {
		reasons[r.Entry] = r.Reason
	}
	if !strings.Contains(reasons["0.0.0.0:18080"], "not a unicast address") {
		t.Errorf("0.0.0.0:18080: reason %q", reasons["0.0.0.0:18080"])
	}
	out := n.d.MustCLI("status")
	if !strings.Contains(out, "entries left out") || !strings.Contains(out, "left out over the limit") {
		t.Errorf("ctlbd status does not show the rejected and trimmed candidates:\n%s", out)
	}

	page := scrape(t, n.netns, "127.0.0.1:9464")
	if v := metric(t, page, "ctlb_source_rejected_entries", fmt.Sprintf(`source="exec",vip=%q`, vip)); v != 3 {
		t.Errorf("ctlb_source_rejected_entries = %v, want 3", v)
	}
	if v := metric(t, page, "ctlb_service_candidates_trimmed", fmt.Sprintf(`vip=%q`, vip)); v != 1100-1024 {
		t.Errorf("ctlb_service_candidates_trimmed = %v, want %d", v, 1100-1024)
	}

	// The map still follows health.
	started[1].Close()
	took = n.waitSet(vip, []string{live[0], live[2]}, 5*time.Second)
	t.Logf("a live server died: out of the map after %v", took)
	testutil.StartServers(t, n.netns, live[1])
	took = n.waitSet(vip, live, 5*time.Second)
	t.Logf("it came back: in the map after %v", took)
}
