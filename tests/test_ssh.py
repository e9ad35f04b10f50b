"""The deepspeed launcher over a real sshd: DeepSpeed's pdsh runner reaches two "nodes" by ssh.

The test starts OpenSSH's sshd on 127.0.0.1 with a host key and a client key it makes, and names
two hosts for it in the user's ~/.ssh/config (a marked block, removed afterwards): the names a
hostfile lists. `.ci/run` installs openssh-server and pdsh from Debian's packages when absent.
"""

import os
import pwd
import shutil
import signal
import subprocess
import time

import pytest

from tests.helpers import free_port
from tests.test_launchers import env_for, losses, run_launcher

pytestmark = pytest.mark.slow

HOSTS = ("glm-test-node-a", "glm-test-node-b")
MARK = "# megatron-glm tests: two hosts on a local sshd (removed when the test ends)"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    tools = {t: shutil.which(t) or f"/usr/sbin/{t}" for t in ("sshd", "ssh", "ssh-keygen", "pdsh")}
    missing = [t for t, p in tools.items() if not os.path.exists(p)]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: apt-get install openssh-server pdsh (.ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("sshd needs root to start here")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run(
            [tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)],
            check=True,
        )
    shutil.copy(root / "client.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host\n"
        f"AuthorizedKeysFile {root}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {root}/sshd.pid\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)  # its privilege separation directory
    subprocess.run(
        [tools["sshd"], "-f", str(root / "sshd_config"), "-E", str(root / "sshd.log")], check=True
    )
    # ssh reads the user's own config (its home from the password database, not $HOME)
    ssh_dir = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ssh")
    config = os.path.join(ssh_dir, "config")
    made_dir = not os.path.isdir(ssh_dir)
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    before = open(config).read() if os.path.exists(config) else None
    block = (
        f"\n{MARK}\nHost {' '.join(HOSTS)}\n    HostName 127.0.0.1\n    Port {port}\n"
        f"    IdentityFile {root}/client\n    IdentitiesOnly yes\n    StrictHostKeyChecking no\n"
        "    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n"
    )
    with open(config, "a") as f:
        f.write(block)
    try:
        end = time.time() + 30
        while subprocess.run(
            [tools["ssh"], "-o", "PasswordAuthentication=no", HOSTS[0], "true"], capture_output=True
        ).returncode:
            assert time.time() < end, (root / "sshd.log").read_text()
            time.sleep(0.3)
        yield root
    finally:
        if before is None:
            os.remove(config)
            if made_dir:
                os.rmdir(ssh_dir)
        else:
            with open(config, "w") as f:
                f.write(before)
        try:
            os.kill(int((root / "sshd.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def test_deepspeed_launcher_trains_on_two_hosts_reached_by_ssh(sshd, tmp_path, data):
    """A hostfile of two hosts: DeepSpeed's runner checks passwordless ssh, pdsh starts a launcher on each
    over ssh, and the two ranks (one per host) train together."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    save = str(tmp_path / "ckpt")
    env = env_for(data, save, HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", TRAIN_ITERS="2")
    env.pop("DS_ENV_FILE", None)
    result = run_launcher("deepspeed.sh", env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "+ deepspeed --launcher pdsh" in out and "x 2 data-parallel ranks" in out
    # each host ran its share, and said so through pdsh
    assert all(f"{h}: " in out for h in HOSTS), out[-4000:]
    assert sorted(losses(save)) == [1, 2]
