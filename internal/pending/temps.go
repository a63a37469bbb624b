package pending

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// tempPrefix starts the temporary file Write renames into place; os.CreateTemp
// ends its name with a decimal number.
func tempPrefix(containerID string) string { return ".tmp-" + containerID + "-" }

// RemoveTemps removes the temporary files of a container's record that a
// plugin killed half-way through Write left behind. Nothing else ever
// removes them: they are not records, so neither ctlbd nor DEL would. Only
// the plugin writes records, and the runtime never runs two operations of
// one container at once, so no live Write of this container owns one.
func RemoveTemps(stateDir, containerID string) (int, error) {
	if err := ValidateContainerID(containerID); err != nil {
		return 0, err
	}
	entries, err := os.ReadDir(Dir(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("pending record %s: list temporary files: %w", containerID, err)
	}
	n := 0
	for _, e := range entries {
		// The rest must be CreateTemp's number alone: container "a" must not
		// take the files of container "a-1".
		rest, ok := strings.CutPrefix(e.Name(), tempPrefix(containerID))
		if !ok || rest == "" || strings.Trim(rest, "0123456789") != "" {
			continue
		}
		if err := os.Remove(filepath.Join(Dir(stateDir), e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return n, fmt.Errorf("pending record %s: remove temporary file: %w", containerID, err)
		}
		n++
	}
	return n, nil
}
