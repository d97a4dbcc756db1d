// containerd's snapshotter conformance suite run against `layerfs snapshotter` over its socket, through
// containerd's own proxy client: each sub-test gets a fresh snapshotter on a fresh root. Built in GOPATH
// mode from Debian's containerd sources (tests/test_containerd_suite.py builds and runs it); $LAYERFS names
// the layerfs program, $LAYERFS_FLAGS its extra snapshotter flags (--mount-helper), and mount.fuse3 finds
// `layerfs` on $PATH for the suite's mounts.
package containerd

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestLayerfs(t *testing.T) {
	testsuite.SnapshotterSuite(t, "Layerfs", newSnapshotter)
}

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	// (beside the root, in the suite's temporary directory: removed with it)
	socket := filepath.Join(filepath.Dir(root), "snapshotter.sock")
	args := append([]string{"snapshotter", "--address", socket, "--root", root}, strings.Fields(os.Getenv("LAYERFS_FLAGS"))...)
	server := exec.Command(os.Getenv("LAYERFS"), args...)
	server.Stdout, server.Stderr = os.Stderr, os.Stderr
	// (a suite that dies, by its timeout's panic say, takes its snapshotters with it)
	server.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := server.Start(); err != nil {
		return nil, nil, err
	}
	dialing, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dialing, dialer.DialAddress(socket),
		grpc.WithInsecure(), grpc.WithBlock(), grpc.WithContextDialer(dialer.ContextDialer))
	if err != nil {
		server.Process.Kill()
		server.Wait()
		return nil, nil, err
	}
	snapshotter := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "layerfs")
	stop := func() error {
		conn.Close()
		server.Process.Signal(syscall.SIGTERM)
		err := server.Wait()
		detachUnder(root) // (a stopped snapshotter leaves its unions served, for the containers on them)
		return err
	}
	return snapshotter, stop, nil
}

// detachUnder lazily unmounts every mount below root, before the suite removes its directory.
func detachUnder(root string) {
	mounts, err := os.Open("/proc/self/mounts")
	if err != nil {
		return
	}
	defer mounts.Close()
	lines := bufio.NewScanner(mounts)
	for lines.Scan() {
		fields := strings.Fields(lines.Text())
		if len(fields) > 1 && strings.HasPrefix(fields[1], root+"/") {
			syscall.Unmount(fields[1], syscall.MNT_DETACH)
		}
	}
}
