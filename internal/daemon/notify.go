package daemon

import (
	"fmt"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
)

// notify tells systemd (Type=notify, $NOTIFY_SOCKET) how the daemon is
// doing; without a notify socket it does nothing. READY=1 is sent once the
// control API serves, so a unit ordered Before=containerd.service really
// is up before the runtime starts pods.
func (d *Daemon) notify(state string) {
	sent, err := sddaemon.SdNotify(false, state)
	if err != nil {
		d.log.Warn("sd_notify", "state", state, "error", err)
	} else if sent {
		d.log.Debug("sd_notify", "state", state)
	}
}

func readyState(services int) string {
	return fmt.Sprintf("%s\nSTATUS=serving %d services", sddaemon.SdNotifyReady, services)
}
