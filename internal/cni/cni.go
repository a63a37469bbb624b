package cni

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ctlb/ctlb/internal/cgroupv2"
	"github.com/ctlb/ctlb/internal/pending"
	"github.com/ctlb/ctlb/internal/podcgroup"
	"github.com/ctlb/ctlb/pkg/api"
	"github.com/ctlb/ctlb/pkg/datapath"
)

// HostAttachmentID names the one attachment of scope "host". It is not a
// container's, so DEL and GC leave it alone: host scope is removed with
// `ctlbd detach`.
const HostAttachmentID = "ctlb-host"

// Attachment IDs the plugin makes start with one of these; GC touches no
// others (ctlbd's own "cgroup-N", the host scope's).
const (
	attachmentPrefix       = "cni-"
	hashedAttachmentPrefix = "cnih-"
)

// AttachmentID is the datapath attachment of a container: "cni-<ID>". A
// container ID that cannot be a bpffs name (CNI allows dots, bpffs does not;
// or too long) is hashed instead, so the mapping stays a function of the ID.
func AttachmentID(containerID string) string {
	id := attachmentPrefix + containerID
	if datapath.ValidateAttachmentID(id) == nil {
		return id
	}
	sum := sha256.Sum256([]byte(containerID))
	return hashedAttachmentPrefix + hex.EncodeToString(sum[:20])
}

func ownedAttachment(id string) bool {
	return strings.HasPrefix(id, attachmentPrefix) || strings.HasPrefix(id, hashedAttachmentPrefix)
}

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

func newCall(args *skel.CmdArgs, cmd string, needPrev bool) (*call, error) {
	conf, err := ParseConf(args.StdinData, needPrev)
	if err != nil {
		return nil, err
	}
	log, closeLog, err := conf.logger()
	if err != nil {
		return nil, cniErr(types.ErrIOFailure, "ctlb: open logFile", err)
	}
	log = log.With("cmd", cmd)
	if args.ContainerID != "" {
		log = log.With("containerID", args.ContainerID)
	}
	return &call{args: args, conf: conf, log: log, close: closeLog}, nil
}

func (c *Conf) logger() (*slog.Logger, func(), error) {
	level := slog.LevelWarn
	var w io.Writer = os.Stderr
	closeFn := func() {}
	if c.LogFile != "" {
		f, err := os.OpenFile(c.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, nil, err
		}
		w, closeFn, level = f, func() { f.Close() }, slog.LevelInfo
	}
	if c.LogLevel != "" {
		_ = level.UnmarshalText([]byte(c.LogLevel))
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: level})).With("plugin", "ctlb"), closeFn, nil
}

// openDatapath adopts ctlbd's pins. Not pinned yet means ctlbd has not run
// on this bpffs: try again later.
func (c *call) openDatapath(notPinnedCode uint) (*datapath.Datapath, error) {
	dp, err := datapath.Open(c.conf.BPFFS)
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
	uid := args["K8S_POD_UID"]
	if uid != "" {
		if err := podcgroup.ValidatePodUID(uid); err != nil {
			return podcgroup.Hints{}, cniErr(types.ErrInvalidEnvironmentVariables, "ctlb: invalid K8S_POD_UID in CNI_ARGS", err)
		}
	}
	return podcgroup.Hints{CgroupPath: c.conf.cgroupPath(), PodUID: uid, Netns: c.args.Netns}, nil
}

// Add attaches ctlb to the pod's cgroup, or records a pending attachment
// when the cgroup does not exist yet, and passes prevResult through.
func Add(args *skel.CmdArgs) error {
	c, err := newCall(args, "ADD", true)
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

	hints, err := c.hints()
	if err != nil {
		return err
	}
	resolver := podcgroup.NewResolver(h)
	found, ok, err := resolver.Resolve(hints)
	if err != nil {
		return cniErr(types.ErrInvalidNetworkConfig, "ctlb: cannot use the pod's cgroup path", err)
	}
	id := AttachmentID(c.args.ContainerID)
	if ok {
		// An earlier ADD of this container may have left a record or, if it
		// was killed half-way, temporary link pins. Clear both: the record
		// first and under its lock, so that ctlbd is not attaching meanwhile.
		if _, err := pending.Remove(c.conf.StateDir, c.args.ContainerID); err != nil {
			c.log.Warn("remove stale pending record", "error", err)
		} else if n, err := datapath.RemoveInterrupted(c.conf.BPFFS, id); err != nil {
			c.log.Warn("remove what an interrupted ADD left", "attachment", id, "error", err)
		} else if n > 0 {
			c.log.Info("removed what an interrupted ADD left", "attachment", id, "dirs", n)
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
			return cniErr(types.ErrInternal, "ctlb: attach", err)
		}
		c.log.Info("attached", "attachment", a.ID, "cgroup", found.Dir, "via", found.Source)
		return nil
	}
	return c.addPending(id, hints, found)
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
	st, err := api.NewClient(c.conf.Socket).NotifyPending(ctx, c.args.ContainerID)
	if err != nil {
		// The record is the source of truth: ctlbd completes it when it
		// (re)starts.
		c.log.Warn("pending attachment recorded, but ctlbd was not told", "error", err, "socket", c.conf.Socket)
		return nil
	}
	c.log.Info("pending attachment recorded", "attachment", id, "state", st.State, "cgroup", st.Cgroup,
		"cgroupDir", rec.CgroupDir, "podUID", rec.PodUID, "netns", rec.Netns)
	return nil
}

// Del detaches and drops any pending record. It succeeds when everything is
// already gone (link, pins, cgroup, netns) and on repeated calls.
func Del(args *skel.CmdArgs) error {
	c, err := newCall(args, "DEL", false)
	if err != nil {
		return err
	}
	defer c.close()
	if err := c.del(); err != nil {
		c.log.Error("DEL failed", "error", err)
		return err
	}
	return nil
}

func (c *call) del() error {
	if c.conf.Scope == ScopeHost {
		c.log.Debug("host scope: the host-wide attachment stays")
		return nil
	}
	// The record goes first, under its lock: after this, ctlbd will not
	// attach for this container, so the detach below is the last word.
	if _, err := pending.Remove(c.conf.StateDir, c.args.ContainerID); err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: remove pending attachment", err)
	}
	if _, err := pending.RemoveTemps(c.conf.StateDir, c.args.ContainerID); err != nil {
		return cniErr(types.ErrIOFailure, "ctlb: remove what an interrupted ADD left of its pending record", err)
	}
	// Detaching needs only the link pins: it works even when the maps or
	// programs were unpinned by hand.
	id := AttachmentID(c.args.ContainerID)
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
	return nil
}

// Check verifies for real: ctlbd answers, the pins exist, the container's
// links are all pinned and attached to the live pod cgroup.
func Check(args *skel.CmdArgs) error {
	c, err := newCall(args, "CHECK", true)
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

	id := AttachmentID(c.args.ContainerID)
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
			return cniErr(types.ErrInvalidNetworkConfig, "ctlb: cannot use the pod's cgroup path", err)
		}
	}

	a, err := dp.Attachment(id)
	if errors.Is(err, datapath.ErrNoAttachment) {
		if rec, perr := pending.Read(c.conf.StateDir, c.args.ContainerID); perr == nil {
			return cniErr(ErrStillPending, fmt.Sprintf("ctlb: attachment %s is still pending: the pod cgroup has not appeared or ctlbd has not completed it", id),
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

func describeHints(f podcgroup.Found) string {
	if f.Dir != "" {
		return f.Dir
	}
	return "no cgroup matches the pod's cgroupPath, K8S_POD_UID or netns"
}

// Status reports readiness: ctlb's objects are pinned and ctlbd answers.
func Status(args *skel.CmdArgs) error {
	c, err := newCall(args, "STATUS", false)
	if err != nil {
		return err
	}
	defer c.close()
	dp, err := datapath.Open(c.conf.BPFFS)
	if err != nil {
		return cniErr(types.ErrPluginNotAvailable, fmt.Sprintf("ctlb: not ready: pinned objects unusable in %s", c.conf.BPFFS), err)
	}
	dp.Close()
	if _, err := c.daemonStatus(); err != nil {
		return cniErr(types.ErrPluginNotAvailable, fmt.Sprintf("ctlb: not ready: ctlbd is unreachable on %s", c.conf.Socket), err)
	}
	return nil
}

// GC removes the plugin's attachments and pending records of containers
// that are not in cni.dev/valid-attachments, and attachments whose cgroup
// died. Without a valid-attachments list, only dead ones go.
func GC(args *skel.CmdArgs) error {
	c, err := newCall(args, "GC", false)
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
	validIDs := map[string]bool{}
	validAtt := map[string]bool{}
	for _, a := range c.conf.ValidAttachments {
		validIDs[a.ContainerID] = true
		validAtt[AttachmentID(a.ContainerID)] = true
	}
	byList := c.conf.hasValidAttachments
	var errs []error

	if byList {
		recs, err := pending.List(c.conf.StateDir)
		if err != nil {
			errs = append(errs, err)
		}
		for _, r := range recs {
			if validIDs[r.ContainerID] {
				continue
			}
			if _, err := pending.Remove(c.conf.StateDir, r.ContainerID); err != nil {
				errs = append(errs, err)
				continue
			}
			c.log.Info("GC: pending record removed", "containerID", r.ContainerID)
		}
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
			if !ownedAttachment(a.ID) {
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
			c.log.Info("GC: detached", "attachment", a.ID, "reason", reason)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return cniErr(types.ErrInternal, "ctlb: GC", err)
	}
	return nil
}
