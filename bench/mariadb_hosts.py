"""What the MariaDB benchmarks share: a populated source, real agents, the operator's
streamed copy, and the clean-up of network namespaces.

``hot_seed.py`` runs both hosts on loopback.  ``replica_bench.py`` puts each host in a
network namespace (:func:`tests.support.netns.create_pair`), so that a primary and its
new replica listen on the same port, as hosts of one fleet do, and the seeded copy's
master is the source host's address.  :class:`Agent` and :class:`StreamedCopy` therefore
take a namespace's command prefix and address; both are empty (loopback) by default.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from orchagent.config import FIELDS  # noqa: E402
from tests.support import mariadb as mariadb_support  # noqa: E402
from tests.support.mariadb import MariaDB, free_port  # noqa: E402

DATABASE = "bench"
_ATTR_TO_KEY = {f.attr: f.key for f in FIELDS}


def populate(db: MariaDB, rows: int) -> None:
    """``rows`` InnoDB rows of about 150 bytes in ``bench.orders``, 20,000 in an Aria table."""
    db.sql(f"""
CREATE DATABASE {DATABASE};
USE {DATABASE};
CREATE TABLE orders (id INT PRIMARY KEY, customer VARCHAR(40) NOT NULL, amount DECIMAL(12,2),
  note VARCHAR(120), created DATETIME, KEY (customer)) ENGINE=InnoDB;
INSERT INTO orders SELECT seq, CONCAT('customer-', seq % 50000), seq % 10000 / 7,
  REPEAT(MD5(seq), 3), '2024-01-01' + INTERVAL seq SECOND FROM seq_1_to_{rows};
CREATE TABLE labels (id INT PRIMARY KEY, label VARCHAR(32)) ENGINE=Aria;
INSERT INTO labels SELECT seq, CONCAT('label-', seq) FROM seq_1_to_20000;
""")


def empty(path: str) -> None:
    """Empty the target, then flush every dirty page (untimed): both methods share one
    disk here, and a run must not pay for writing back the previous run's data (the
    agent's syncfs would, the pipeline never syncs)."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.unlink(full)
    os.sync()


def du(path: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


def agent_settings(db: MariaDB) -> dict:
    """The configuration keys that point an agent at ``db`` (option file, service and
    client commands)."""
    return {_ATTR_TO_KEY[k]: v for k, v in db.agent_settings().items()}


def run_directory(parent: str, tools: tuple[str, ...]) -> str | None:
    """A fresh directory for one run under ``parent`` (``run-<pid>``, readable by the
    server's user), once MariaDB and ``tools`` are known to be here; None (said on
    stderr) when something is missing.  The bench becomes the subreaper of what it
    starts, so a server left by a failed round is still its child to stop."""
    reason = mariadb_support.unavailable_reason()
    for tool in tools:
        if shutil.which(tool) is None:
            reason = reason or f"{tool} is not installed"
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return None
    mariadb_support.become_subreaper()
    os.makedirs(parent, exist_ok=True)
    base = os.path.join(parent, f"run-{os.getpid()}")
    os.makedirs(base)
    os.chmod(base, 0o755)
    return base


class Cleanups:
    """What tests.support.netns.create_pair registers, run at the end in reverse."""

    def __init__(self):
        self.calls = []

    def addCleanup(self, fn, *args, **kwargs):
        self.calls.append((fn, args, kwargs))

    def run(self) -> None:
        while self.calls:
            fn, args, kwargs = self.calls.pop()
            try:
                fn(*args, **kwargs)
            except Exception as e:
                print(f"cleanup failed: {e}", file=sys.stderr)


class Agent:
    """A real agent child process (``twistd -n orchestrator-agent``), driven with urllib.

    ``prefix`` runs it inside a network namespace, where it listens on ``address``.  The
    token is ``TokenFile``'s when the config names one (a controller shares it), else the
    one the agent makes and writes to its TokenHintFile."""

    def __init__(self, directory: str, config: dict, prefix=(), address: str = "127.0.0.1"):
        self.directory = directory
        self.address = address
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.config = dict(config, HTTPPort=self.port, HTTPBindAddress=address,
                           StateDir=os.path.join(directory, "state"),
                           TokenHintFile=os.path.join(directory, "token"), CommandTimeoutSeconds=600)
        path = os.path.join(directory, "agent.conf.json")
        with open(path, "w") as fh:
            json.dump(self.config, fh)
        env = dict(os.environ, PYTHONPATH=REPO)
        self.log = open(os.path.join(directory, "agent.log"), "ab")
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "orchestrator-agent", "--config", path],
            cwd=directory, env=env, stdout=self.log, stderr=self.log)
        token_file = self.config.get("TokenFile") or self.config["TokenHintFile"]
        deadline = time.monotonic() + 30
        while not os.path.exists(token_file) or not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start; see {directory}/agent.log")
            time.sleep(0.05)
        with open(token_file) as fh:
            self.token = fh.read().strip()

    @property
    def host(self) -> str:
        """HOST:PORT, as the ``orchagent`` controller names this agent."""
        return f"{self.address}:{self.port}"

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{self.host}/api/hostname", timeout=1).read()
            return True
        except OSError:
            return False

    def get(self, path: str, **params):
        params["token"] = self.token
        url = f"http://{self.host}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path}: {e.code} {e.read().decode(errors='replace')}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class StreamedCopy:
    """The operator's copy of a running server: ``nc -l | mbstream -x`` into
    ``target_dir`` on the target, ``mariabackup --backup --stream=xbstream | nc -N`` on
    the source.  :meth:`listen` starts the receiving end and returns once it listens;
    :meth:`send` runs the sending end and waits for both."""

    def __init__(self, db: MariaDB, target_dir: str, address: str = "127.0.0.1",
                 source_prefix=(), target_prefix=()):
        self.db = db
        self.target_dir = target_dir
        self.address = address
        self.source_prefix = list(source_prefix)
        self.target_prefix = list(target_prefix)
        self.port = free_port()
        self.receiver: subprocess.Popen | None = None

    def listen(self) -> None:
        self.receiver = subprocess.Popen(
            [*self.target_prefix, "bash", "-o", "pipefail", "-c",
             f"nc -l {self.address} {self.port} | mbstream -x -C {self.target_dir}"],
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.receiver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nc -l {self.address} {self.port} does not listen")
            time.sleep(0.005)

    def _listening(self) -> bool:
        """Whether the port listens, asked of the kernel (a probe connection would be
        the one connection ``nc -l`` accepts)."""
        out = subprocess.run([*self.target_prefix, "ss", "-Hltn", f"sport = :{self.port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        return bool(out.strip())

    def send(self) -> None:
        sender = subprocess.run(
            [*self.source_prefix, "bash", "-o", "pipefail", "-c",
             f"mariabackup --defaults-file={self.db.option_file} --backup "
             f"--stream=xbstream | nc -N {self.address} {self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        received = self.receiver.wait(600)
        if received != 0 or sender.returncode != 0:
            raise RuntimeError(f"the streamed copy failed (sender {sender.returncode}, "
                               f"receiver {received})")
