package cni

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/nri/annotation"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// daemonTimeout bounds every call to ctlbd: ADD must stay fast when the
// daemon hangs.
const daemonTimeout = 2 * time.Second

// call is one invocation's parsed input and logger.
type call struct {
	args  *skel.CmdArgs
	conf  *Conf
	log   *slog.Logger
	close func()
}

// newCall parses stdin strictly (ADD, CHECK, STATUS) or leniently (DEL,
// GC: problems are logged, never returned).
func newCall(args *skel.CmdArgs, cmd string, strict, needPrev bool) (*call, error) {
	var conf *Conf
	var problems []error
	var err error
	if strict {
		conf, err = ParseConf(args.StdinData, needPrev)
	} else {
		conf, problems, err = ParseConfLenient(args.StdinData)
	}
	if err != nil {
		return nil, err
	}
	log, closeLog, logErr := conf.logger()
	log = log.With("cmd", cmd, "network", conf.Name)
	if args.ContainerID != "" {
		log = log.With("containerID", args.ContainerID)
	}
	if args.IfName != "" {
		log = log.With("ifName", args.IfName)
	}
	if logErr != nil {
		log.Warn("logFile cannot be opened: logging to stderr", "logFile", conf.LogFile, "error", logErr)
	}
	for _, p := range problems {
		log.Warn("network config problem ignored; what needs it is skipped", "problem", p)
	}
	return &call{args: args, conf: conf, log: log, close: closeLog}, nil
}

// logger writes to logFile, or to stderr without one or when it cannot be
// opened (the error is returned for the caller to log): a log that cannot
// be written is no reason to fail a pod.
func (c *Conf) logger() (*slog.Logger, func(), error) {
	level := slog.LevelWarn
	var w io.Writer = os.Stderr
	closeFn := func() {}
	var openErr error
	if c.LogFile != "" {
		f, err := os.OpenFile(c.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			openErr = err
		} else {
			w, closeFn, level = f, func() { f.Close() }, slog.LevelInfo
		}
	}
	if c.LogLevel != "" {
		_ = level.UnmarshalText([]byte(c.LogLevel))
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level})).With("plugin", "ctlb"), closeFn, openErr
}

// openDatapath adopts ctlbd's programs (ADD attaches; it needs no map). Not
// pinned yet means ctlbd has not run on this bpffs: try again later.
func (c *call) openDatapath(notPinnedCode uint) (*datapath.Datapath, error) {
	dp, err := datapath.OpenForAttach(c.conf.BPFFS)
	if err != nil {
		return nil, c.openErr(err, notPinnedCode)
	}
	return dp, nil
}

func (c *call) openErr(err error, notPinnedCode uint) error {
	switch {
	case errors.Is(err, datapath.ErrNotPinned):
		return cniErr(notPinnedCode, fmt.Sprintf("ctlb: BPF objects are not pinned in %s (is ctlbd running with this bpffs?)", c.conf.BPFFS), err)
	case errors.Is(err, datapath.ErrLayout):
		return cniErr(ErrLayout, "ctlb: pinned objects have another layout (plugin and ctlbd versions differ)", err)
	}
	return cniErr(types.ErrInternal, "ctlb: open pinned objects", err)
}

// notPinnedWhileRunning says what is wrong when ctlbd answers but the pins
// are not there: the network points at another bpffs than ctlbd's, or pins
// were removed under ctlbd. err names the first missing pin.
func (c *call) notPinnedWhileRunning(st api.Status, err error) error {
	if st.BPFFS != "" && filepath.Clean(st.BPFFS) != c.conf.BPFFS {
		return cniErr(ErrNotPinned, fmt.Sprintf("ctlb: nothing usable is pinned in %s: ctlbd on %s pins in %s, and the network's bpffs must be ctlbd's",
			c.conf.BPFFS, c.conf.Socket, st.BPFFS), err)
	}
	return cniErr(ErrNotPinned, fmt.Sprintf("ctlb: ctlbd runs, but pins are missing from its bpffs %s (removed by hand?); "+
		"attached pods keep working, new ones cannot attach until ctlbd's reconciler pins them again", c.conf.BPFFS), err)
}

func hierarchy() (cgroupv2.Hierarchy, error) {
	h, err := cgroupv2.Default()
	if err != nil {
		return h, cniErr(ErrNoCgroupV2, "ctlb: no cgroup v2 hierarchy (cgroup BPF hooks need it)", err)
	}
	return h, nil
}

// hints gathers what the call knows about the pod.
func (c *call) hints() (podcgroup.Hints, error) {
	args, err := parseArgs(c.args.Args)
	if err != nil {
		return podcgroup.Hints{}, cniErr(types.ErrInvalidEnvironmentVariables, "ctlb: invalid CNI_ARGS", err)
	}
	uid := string(args.K8S_POD_UID)
	if uid != "" {
		if err := podcgroup.ValidatePodUID(uid); err != nil {
			return podcgroup.Hints{}, cniErr(types.ErrInvalidEnvironmentVariables, "ctlb: invalid K8S_POD_UID in CNI_ARGS", err)
		}
	}
	return podcgroup.Hints{CgroupPath: c.conf.cgroupPath(), PodUID: uid, Netns: c.args.Netns}, nil
}

// attachmentID is this call's datapath attachment: the container's, or,
// with a static cgroupPath in the config, one shared by every pod of the
// network (the kernel allows 64 programs per hook and cgroup: one link set
// per pod on one cgroup would run out, and would run the program once per
// pod on every connect).
func (c *call) attachmentID() string {
	if c.conf.CgroupPath != "" {
		return staticAttachmentID(c.conf.Name, c.conf.CgroupPath)
	}
	return AttachmentID(c.conf.Name, c.args.ContainerID)
}

func (c *call) owner() Owner {
	o := Owner{Network: c.conf.Name, ContainerID: c.args.ContainerID, IfName: c.args.IfName}
	// Best effort, for display only: ADD refuses bad CNI_ARGS elsewhere,
	// and DEL must succeed whatever they hold.
	if a, err := parseArgs(c.args.Args); err == nil {
		o.PodNamespace, o.PodName = podName(string(a.K8S_POD_NAMESPACE)), podName(string(a.K8S_POD_NAME))
	}
	return o
}

// Add attaches ctlb to the pod's cgroup, or records a pending attachment
// when the cgroup does not exist yet, and passes prevResult through.
func Add(args *skel.CmdArgs) error {
	c, err := newCall(args, "ADD", true, true)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.add(); err != nil {
		c.log.Error("ADD failed", "error", err)
		return err
	}
	return types.PrintResult(c.conf.PrevResult, c.conf.CNIVersion)
}

func (c *call) add() error {
	h, err := hierarchy()
	if err != nil {
		return err
	}
	dp, err := c.openDatapath(types.ErrTryAgainLater)
	if err != nil {
		return err
	}
	defer dp.Close()

	if c.conf.Scope == ScopeHost {
		root, err := h.Resolve(h.Mount, true)
		if err != nil {
			return cniErr(types.ErrInternal, "ctlb: host scope", err)
		}
		if _, err := dp.Attach(HostAttachmentID, root); err != nil {
			return cniErr(types.ErrInternal, "ctlb: attach at the cgroup v2 root", err)
		}
		c.log.Info("attached host-wide", "cgroup", root)
		return nil
	}

	if c.nriScoped() {
		return nil
	}
	hints, err := c.hints()
	if err != nil {
		return err
	}
	found, ok, err := podcgroup.NewResolver(h).Resolve(hints)
	if err != nil {
		return cniErr(types.ErrInvalidNetworkConfig, "ctlb: cannot use the pod's cgroup", err)
	}
	id := c.attachmentID()
	// The owner goes first: from here a DEL of this interface (the runtime's
	// answer to a failed ADD) is what removes the attachment, and a DEL of
	// another interface of the container leaves it.
	unlock, err := lockOwners(c.conf.StateDir)
	if err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: attachment owners", err)
	}
	before, _ := listOwners(c.conf.StateDir, id)
	before = slices.DeleteFunc(before, c.owner().same) // a retried ADD of this interface
	err = addOwner(c.conf.StateDir, id, c.owner())
	unlock()
	if err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: attachment owners", err)
	}
	if len(before) > 0 {
		c.log.Info("sharing the attachment of another interface of the container", "attachment", id, "owners", len(before))
	}
	if err := c.attachOrRecord(dp, id, hints, found, ok, len(before) > 0); err != nil {
		// A failed ADD of the first interface leaves no owner behind: bad
		// input changes nothing.
		if len(before) == 0 {
			if unlock, lerr := lockOwners(c.conf.StateDir); lerr == nil {
				_, _ = removeOwner(c.conf.StateDir, id, c.owner())
				unlock()
			}
		}
		return err
	}
	return nil
}

// shared says that other interfaces own the attachment too: an attach that
// fails then gives back the pending record it took, which is theirs.
func (c *call) attachOrRecord(dp *datapath.Datapath, id string, hints podcgroup.Hints, found podcgroup.Found, ok, shared bool) error {
	if !ok {
		if found.Refused != nil {
			c.log.Warn("no pod cgroup from the sandbox's netns yet: refusing a shared cgroup, recording a pending attachment", "error", found.Refused)
		}
		return c.addPending(id, hints, found)
	}
	// An earlier ADD of this container may have left a record or, if it
	// was killed half-way, temporary link pins. Clear both: the record
	// first and under its lock, so that ctlbd is not attaching meanwhile.
	// A shared attachment's (static cgroupPath) temporaries may be another
	// pod's ADD in flight: those are left to the last DEL and to ctlbd's
	// age-based sweep (datapath.RemoveStale).
	took, err := pending.Remove(c.conf.StateDir, id)
	if err != nil {
		c.log.Warn("remove stale pending record", "error", err)
	} else if c.conf.CgroupPath == "" {
		if n, err := datapath.RemoveInterrupted(c.conf.BPFFS, id); err != nil {
			c.log.Warn("remove what an interrupted ADD left", "attachment", id, "error", err)
		} else if n > 0 {
			c.log.Info("removed what an interrupted ADD left", "attachment", id, "dirs", n)
		}
	}
	a, err := dp.Attach(id, found.Dir)
	if err != nil {
		cur, curErr := dp.Attachment(id)
		if curErr == nil && !cur.Alive && cur.CgroupPath == "" {
			// Left on a cgroup that died (a sandbox torn down without
			// DEL, its ID reused): it does nothing; replace it.
			c.log.Warn("replacing an attachment on a dead cgroup", "attachment", id)
			if err := dp.Detach(id); err != nil && !errors.Is(err, datapath.ErrNoAttachment) {
				return cniErr(types.ErrInternal, "ctlb: detach dead attachment", err)
			}
			a, err = dp.Attach(id, found.Dir)
		} else if curErr == nil {
			return cniErr(ErrWrongCgroup, fmt.Sprintf("ctlb: container %s is already attached to cgroup %s (id %d), not %s",
				c.args.ContainerID, cur.CgroupPath, cur.CgroupID, found.Dir), err)
		}
	}
	if err != nil {
		if took && shared {
			// Another interface's ADD left the record and succeeded:
			// ctlbd retries the attachment from it.
			if perr := c.addPending(id, hints, found); perr != nil {
				c.log.Error("give the pending record back", "attachment", id, "error", perr)
			}
		}
		return cniErr(types.ErrInternal, "ctlb: attach", err)
	}
	c.log.Info("attached", "attachment", a.ID, "cgroup", found.Dir, "via", found.Source)
	return nil
}

// addPending records the attachment for ctlbd to complete and tells ctlbd.
// ADD does not wait for the cgroup: the runtime creates it after ADD.
func (c *call) addPending(id string, hints podcgroup.Hints, found podcgroup.Found) error {
	rec := pending.Record{
		ContainerID:  c.args.ContainerID,
		AttachmentID: id,
		BPFFS:        c.conf.BPFFS,
		CgroupDir:    found.Dir, // set only when the runtime named the cgroup
		PodUID:       hints.PodUID,
		Netns:        hints.Netns,
		Created:      time.Now().UTC(),
	}
	o := c.owner()
	rec.PodNamespace, rec.PodName = o.PodNamespace, o.PodName
	if hints.Netns != "" {
		if nid, err := podcgroup.StatNetns(hints.Netns); err == nil {
			rec.NetnsID = nid
		}
	}
	if err := pending.Write(c.conf.StateDir, rec); err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: write pending attachment", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), daemonTimeout)
	defer cancel()
	st, err := api.NewClient(c.conf.Socket).NotifyPending(ctx, c.args.ContainerID, id)
	if err != nil {
		// The record is the source of truth: ctlbd completes it when it
		// (re)starts.
		c.log.Warn("pending attachment recorded, but ctlbd was not told", "error", err, "socket", c.conf.Socket)
		return nil
	}
	if st.State == pending.StateAbsent {
		// ctlbd looked for the record and found none. Completed or taken
		// by a DEL in between, it would be gone from here too; still here,
		// it is in a directory ctlbd does not read, and the pod would
		// never be attached. ADD still succeeds: the record stays for a
		// ctlbd started with this stateDir.
		if _, err := pending.Read(c.conf.StateDir, id); err == nil {
			attrs := []any{"attachment", id, "stateDir", c.conf.StateDir, "socket", c.conf.Socket}
			if st.StateDir != "" { // an older ctlbd does not say
				attrs = append(attrs, "ctlbdStateDir", st.StateDir)
			}
			c.log.Warn("ctlbd does not see the pending record just written: is ctlbd's --state-dir the same as the plugin's stateDir? "+
				"Until a ctlbd reads this stateDir, the pod is not attached", attrs...)
			return nil
		}
	}
	c.log.Info("pending attachment recorded", "attachment", id, "state", st.State, "cgroup", st.Cgroup,
		"cgroupDir", rec.CgroupDir, "podUID", rec.PodUID, "netns", rec.Netns)
	return nil
}

// Del removes this interface's ownership and, with the last owner, the
// pending record and the attachment. It is best effort: whatever is wrong
// with the config beyond "type" (unknown keys, bad values, an unopenable
// logFile, any prevResult), ctlbd down, pins, cgroup or netns gone, it
// succeeds and prints nothing. Only a failure to remove state that is
// there (an I/O error on the state directory or the bpffs) is an error.
// (ARCHITECTURE.md I5)
func Del(args *skel.CmdArgs) error {
	c, err := newCall(args, "DEL", false, false)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.del(); err != nil {
		c.log.Error("DEL failed: state is left behind", "error", err)
		return err
	}
	return nil
}

func (c *call) del() error {
	if c.conf.Scope == ScopeHost {
		c.log.Debug("host scope: the host-wide attachment stays")
		return nil
	}
	if !c.conf.usable("stateDir") || !c.conf.usable("name") {
		// ADD could not have run with this config: nothing of it to remove.
		c.log.Warn("DEL with an unusable stateDir or name: nothing to do")
		return nil
	}
	id := c.attachmentID()
	unlock, err := lockOwners(c.conf.StateDir)
	if err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: attachment owners", err)
	}
	defer unlock()
	left, err := removeOwner(c.conf.StateDir, id, c.owner())
	if err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: attachment owners", err)
	}
	if left > 0 {
		c.log.Info("other interfaces of the container keep the attachment", "attachment", id, "owners", left)
		return nil
	}
	// The record goes first, under its lock: after this, ctlbd will not
	// attach for this container, so the detach below is the last word.
	if _, err := pending.Remove(c.conf.StateDir, id); err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: remove pending attachment", err)
	}
	if _, err := pending.RemoveTemps(c.conf.StateDir, id); err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: remove what an interrupted ADD left of its pending record", err)
	}
	if !c.conf.usable("bpffs") {
		c.log.Warn("DEL with an unusable bpffs: no attachment can be there")
		return nil
	}
	// Detaching needs only the link pins: it works even when the maps or
	// programs were unpinned by hand, or ctlbd is down.
	if err := datapath.DetachPinned(c.conf.BPFFS, id); err == nil {
		c.log.Info("detached", "attachment", id)
	} else if !errors.Is(err, datapath.ErrNoAttachment) {
		return cniErr(types.ErrInternal, "ctlb: detach", err)
	}
	// Links a killed ADD or DEL left in temporary directories still hold
	// the programs on the cgroup.
	n, err := datapath.RemoveInterrupted(c.conf.BPFFS, id)
	if err != nil {
		return cniErr(types.ErrInternal, "ctlb: detach what an interrupted call left", err)
	}
	if n > 0 {
		c.log.Info("detached what an interrupted call left", "attachment", id, "dirs", n)
	}
	c.delLegacy()
	return nil
}

// delLegacy removes what a plugin older than per-network attachments made
// for the container ("cni-<containerID>", its pending record keyed by
// container ID), so pods attached before an upgrade are torn down too.
// Best effort: failures are logged.
func (c *call) delLegacy() {
	if c.conf.CgroupPath != "" {
		return
	}
	legacy := attachmentPrefix + c.args.ContainerID
	if datapath.ValidateAttachmentID(legacy) != nil {
		return
	}
	if rec, err := pending.Read(c.conf.StateDir, c.args.ContainerID); err == nil && rec.AttachmentID == legacy {
		if _, err := pending.Remove(c.conf.StateDir, c.args.ContainerID); err != nil {
			c.log.Warn("remove a pending record of an older plugin", "attachment", legacy, "error", err)
		}
	}
	if err := datapath.DetachPinned(c.conf.BPFFS, legacy); err == nil {
		c.log.Info("detached an attachment of an older plugin", "attachment", legacy)
	} else if !errors.Is(err, datapath.ErrNoAttachment) {
		c.log.Warn("detach an attachment of an older plugin", "attachment", legacy, "error", err)
	}
}

// Check verifies for real: ctlbd answers, the pins exist, the container's
// links are all pinned and attached to the live pod cgroup. A pending
// attachment younger than pendingGrace passes: the spec grants CHECK right
// after ADD the time the runtime takes to create the cgroup.
func Check(args *skel.CmdArgs) error {
	c, err := newCall(args, "CHECK", true, true)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.check(); err != nil {
		c.log.Warn("CHECK failed", "error", err)
		return err
	}
	return nil
}

func (c *call) daemonStatus() (api.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), daemonTimeout)
	defer cancel()
	return api.NewClient(c.conf.Socket).Status(ctx)
}

func (c *call) check() error {
	st, err := c.daemonStatus()
	if err != nil {
		return cniErr(types.ErrTryAgainLater, fmt.Sprintf("ctlb: ctlbd is unreachable on %s", c.conf.Socket), err)
	}
	h, err := hierarchy()
	if err != nil {
		return err
	}
	dp, err := datapath.Open(c.conf.BPFFS)
	if errors.Is(err, datapath.ErrNotPinned) {
		return c.notPinnedWhileRunning(st, err)
	}
	if err != nil {
		return c.openErr(err, ErrNotPinned)
	}
	defer dp.Close()

	id := c.attachmentID()
	var expect podcgroup.Found
	var expectOK bool
	if c.conf.Scope == ScopeHost {
		id, expect, expectOK = HostAttachmentID, podcgroup.Found{Dir: h.Mount, Source: "scope host"}, true
	} else {
		hints, err := c.hints()
		if err != nil {
			return err
		}
		expect, expectOK, err = podcgroup.NewResolver(h).Resolve(hints)
		if err != nil {
			return cniErr(types.ErrInvalidNetworkConfig, "ctlb: cannot use the pod's cgroup", err)
		}
		owners, err := listOwners(c.conf.StateDir, id)
		if err != nil {
			return cniErr(types.ErrIOFailure, "ctlb: attachment owners", err)
		}
		// An NRI-scoped ADD (below) records no pod-level owner.
		_, nriPod := annotation.ContainerNames(c.conf.RuntimeConfig.PodAnnotations)
		if !nriPod && !slices.ContainsFunc(owners, c.owner().same) {
			return cniErr(ErrNotAttached, fmt.Sprintf("ctlb: interface %s of container %s holds no attachment in network %q (no ADD recorded)",
				c.args.IfName, c.args.ContainerID, c.conf.Name), nil)
		}
	}

	a, err := dp.Attachment(id)
	if _, ok := annotation.ContainerNames(c.conf.RuntimeConfig.PodAnnotations); ok && errors.Is(err, datapath.ErrNoAttachment) {
		// Container scope: ADD left the pod to ctlbd's NRI plugin, which
		// must still be connected to attach the pod's next containers.
		if st.NRI != api.NRIConnected {
			return cniErr(ErrNotAttached, fmt.Sprintf("ctlb: pod is NRI-scoped (%s) but ctlbd's NRI plugin is %s, and there is no pod-level attachment %s",
				annotation.Containers, orNone(st.NRI), id), nil)
		}
		return nil
	}
	if errors.Is(err, datapath.ErrNoAttachment) {
		if rec, perr := pending.Read(c.conf.StateDir, id); perr == nil {
			age := time.Since(rec.Created)
			if age < c.conf.pendingGrace {
				c.log.Info("CHECK: attachment still pending, within pendingGrace", "attachment", id,
					"age", age.Round(time.Millisecond), "pendingGrace", c.conf.pendingGrace)
				return nil
			}
			return cniErr(ErrStillPending, fmt.Sprintf("ctlb: attachment %s is still pending after %s (pendingGrace %s): the pod cgroup has not appeared or ctlbd has not completed it",
				id, age.Round(time.Second), c.conf.pendingGrace),
				fmt.Errorf("record since %s: cgroupDir %q, podUID %q, netns %q", rec.Created.Format(time.RFC3339), rec.CgroupDir, rec.PodUID, rec.Netns))
		}
		return cniErr(ErrNotAttached, fmt.Sprintf("ctlb: no attachment %s: its link pins are missing under %s/links", id, c.conf.BPFFS), err)
	}
	if err != nil {
		return cniErr(types.ErrInternal, "ctlb: read attachment", err)
	}
	if len(a.Missing) > 0 {
		return cniErr(ErrAttachmentIncomplete, fmt.Sprintf("ctlb: attachment %s is incomplete: link pin(s) %s missing under %s/links/%s",
			id, strings.Join(a.Missing, ", "), c.conf.BPFFS, id), nil)
	}
	if !a.Alive {
		return cniErr(ErrCgroupDead, fmt.Sprintf("ctlb: attachment %s is on a dead cgroup (id %d): it no longer exists", id, a.CgroupID), nil)
	}
	if !expectOK {
		return cniErr(ErrWrongCgroup, fmt.Sprintf("ctlb: attachment %s is on cgroup %s, but the pod cgroup cannot be found now", id, a.CgroupPath),
			fmt.Errorf("expected %s", describeHints(expect)))
	}
	want, err := cgroupv2.ID(expect.Dir)
	if err != nil {
		return cniErr(ErrWrongCgroup, fmt.Sprintf("ctlb: attachment %s is on cgroup %s, but the pod cgroup %s is unusable", id, a.CgroupPath, expect.Dir), err)
	}
	if want != a.CgroupID {
		return cniErr(ErrWrongCgroup, fmt.Sprintf("ctlb: attachment %s is on cgroup %s (id %d), not on the pod cgroup %s (id %d, from %s)",
			id, a.CgroupPath, a.CgroupID, expect.Dir, want, expect.Source), nil)
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "not configured"
	}
	return s
}

// nriScoped decides container scope at ADD: the pod's annotations name
// containers and ctlbd's NRI plugin is connected, so ctlbd attaches those
// containers' cgroups and the pod gets no pod-level attachment. Without a
// connected NRI plugin the pod falls back to pod scope, and the log says so.
func (c *call) nriScoped() bool {
	names, ok := annotation.ContainerNames(c.conf.RuntimeConfig.PodAnnotations)
	if !ok {
		return false
	}
	st, err := c.daemonStatus()
	if err == nil && st.NRI == api.NRIConnected {
		c.log.Info("NRI-scoped: ctlbd's NRI plugin attaches the named containers; no pod-level attachment",
			"containers", names, "annotation", annotation.Containers, "nriSocket", st.NRISocket)
		return true
	}
	state := orNone(st.NRI)
	if err != nil {
		state = "unknown: " + err.Error()
	}
	c.log.Warn("pod asks for container scope, but ctlbd's NRI plugin is not connected: falling back to pod scope (every container of the pod)",
		"containers", names, "annotation", annotation.Containers, "nri", state)
	return false
}

func describeHints(f podcgroup.Found) string {
	if f.Dir != "" {
		return f.Dir
	}
	return "no cgroup matches the pod's cgroupPath, K8S_POD_UID or netns"
}

// Status fails only when an ADD would fail: no cgroup v2, or ctlb's
// objects missing from the bpffs or of a layout this plugin does not know.
// ctlbd being down or restarting is not a failure: ADD works from the pins
// alone (a pending record waits for the daemon). containerd 2.x turns a
// STATUS failure into NetworkReady=false for the whole node.
func Status(args *skel.CmdArgs) error {
	c, err := newCall(args, "STATUS", true, false)
	if err != nil {
		return err
	}
	defer c.close()
	if _, err := cgroupv2.Default(); err != nil {
		return cniErr(types.ErrPluginNotAvailable, "ctlb: not ready: no cgroup v2 hierarchy (cgroup BPF hooks need it)", err)
	}
	dp, err := datapath.Open(c.conf.BPFFS)
	switch {
	case errors.Is(err, datapath.ErrLayout):
		return cniErr(types.ErrPluginNotAvailable, fmt.Sprintf("ctlb: not ready: the objects pinned in %s have another layout (plugin and ctlbd versions differ)", c.conf.BPFFS), err)
	case err != nil:
		return cniErr(types.ErrPluginNotAvailable, fmt.Sprintf("ctlb: not ready: pinned objects unusable in %s (is ctlbd running with this bpffs?)", c.conf.BPFFS), err)
	}
	dp.Close()
	if _, err := c.daemonStatus(); err != nil {
		c.log.Info("STATUS: ctlbd does not answer; ADD still works from the pins", "socket", c.conf.Socket, "error", err)
	}
	return nil
}

// GC removes the network's attachments, owners and pending records that
// are not in cni.dev/valid-attachments, and the network's attachments whose
// cgroup died. Without a valid-attachments list, only dead ones go. Other
// networks' state, ctlbd's own attachments and the host scope's are never
// touched. Like DEL it parses leniently.
func GC(args *skel.CmdArgs) error {
	c, err := newCall(args, "GC", false, false)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.gc(); err != nil {
		c.log.Error("GC failed", "error", err)
		return err
	}
	return nil
}

func (c *call) gc() error {
	if !c.conf.usable("stateDir") || !c.conf.usable("name") {
		c.log.Warn("GC with an unusable stateDir or name: nothing to do")
		return nil
	}
	network := c.conf.Name
	validAtt := map[string]bool{}
	validOwner := map[Owner]bool{}
	for _, a := range c.conf.ValidAttachments {
		validAtt[AttachmentID(network, a.ContainerID)] = true
		validOwner[Owner{Network: network, ContainerID: a.ContainerID, IfName: a.IfName}] = true
	}
	byList := c.conf.hasValidAttachments
	var errs []error

	unlock, err := lockOwners(c.conf.StateDir)
	if err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: attachment owners", err)
	}
	defer unlock()
	if byList {
		ids, err := ownedAttachments(c.conf.StateDir, network)
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range ids {
			owners, err := listOwners(c.conf.StateDir, id)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			for _, o := range owners {
				if validOwner[o.key()] {
					continue
				}
				if _, err := removeOwner(c.conf.StateDir, id, o); err != nil {
					errs = append(errs, err)
					continue
				}
				c.log.Info("GC: owner removed", "attachment", id, "containerID", o.ContainerID, "ifName", o.IfName)
			}
		}
		// An attachment still owned by a valid interface stays, whatever
		// its ID (a static cgroupPath's is shared by many containers),
		// and so does its pending record: the owners go first so that a
		// shared attachment still waiting for its cgroup is not lost.
		ids, _ = ownedAttachments(c.conf.StateDir, network)
		for _, id := range ids {
			if owners, err := listOwners(c.conf.StateDir, id); err == nil && len(owners) > 0 {
				validAtt[id] = true
			}
		}
		recs, err := pending.List(c.conf.StateDir)
		if err != nil {
			errs = append(errs, err)
		}
		for _, r := range recs {
			if !ownedBy(network, r.AttachmentID) || validAtt[r.AttachmentID] {
				continue
			}
			if _, err := pending.Remove(c.conf.StateDir, r.Key()); err != nil {
				errs = append(errs, err)
				continue
			}
			c.log.Info("GC: pending record removed", "attachment", r.AttachmentID, "containerID", r.ContainerID)
		}
	}

	if !c.conf.usable("bpffs") {
		if err := errors.Join(errs...); err != nil {
			return cniErr(types.ErrInternal, "ctlb: GC", err)
		}
		return nil
	}
	dp, err := datapath.Open(c.conf.BPFFS)
	if err != nil {
		if !errors.Is(err, datapath.ErrNotPinned) {
			errs = append(errs, err)
		}
	} else {
		defer dp.Close()
		list, err := dp.Attachments()
		if err != nil {
			errs = append(errs, err)
		}
		for _, a := range list {
			if !ownedBy(network, a.ID) {
				continue
			}
			reason := ""
			switch {
			case byList && !validAtt[a.ID]:
				reason = "not a valid attachment"
			case !a.Alive:
				// Listing indexes the cgroups once; read this one again so a
				// cgroup made after that walk is not taken for dead.
				if again, err := dp.Attachment(a.ID); err == nil && !again.Alive {
					reason = "cgroup died"
				}
			}
			if reason == "" {
				continue
			}
			if err := dp.Detach(a.ID); err != nil && !errors.Is(err, datapath.ErrNoAttachment) {
				errs = append(errs, err)
				continue
			}
			if err := os.RemoveAll(filepath.Join(ownersDir(c.conf.StateDir), a.ID)); err != nil {
				errs = append(errs, err)
			}
			c.log.Info("GC: detached", "attachment", a.ID, "reason", reason)
		}
	}
	if byList {
		// A GC or DEL killed half-way through a detach left a temporary
		// directory whose links still hold the programs: finish it.
		ids, err := datapath.Interrupted(c.conf.BPFFS)
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range ids {
			if !ownedBy(network, id) || validAtt[id] {
				continue
			}
			if _, err := datapath.RemoveInterruptedAll(c.conf.BPFFS, id); err != nil {
				errs = append(errs, err)
				continue
			}
			c.log.Info("GC: removed what an interrupted call left", "attachment", id)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return cniErr(types.ErrInternal, "ctlb: GC", err)
	}
	return nil
}
