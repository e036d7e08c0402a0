#!/usr/bin/env python3
"""The whole life of the Debian package on this machine: build, lint, install, run, purge.

    python3 packaging/deb_test.py [--keep] [--host]

1. Copies the working tree (tracked and untracked, not ignored files) to a temporary
   directory and runs ``dpkg-buildpackage -us -uc -b`` there, so the repository gets no
   build artefacts; checks the .deb's name against debian/changelog and setup.py.
2. Runs lintian; any error (E:) fails.
3. In a private mount namespace (``unshare --mount``) where /etc, /usr, /var (and /lib,
   /opt where they are directories) are copy-on-write overlays on a tmpfs, and where the
   package and its paths do not exist (removed from that view only) and systemd is not
   seen: everything steps 3 to 6 do to dpkg's database and the file system vanishes with
   the namespace, and whatever this machine has of the package (the quick start's
   /var/lib/orchestrator-agent, say) neither stops the test nor is touched by it.  With
   ``--host`` they run on the machine itself, as a real install does (under systemd when
   it is PID 1), and skip where the package or its files already exist.
   Installs a stand-in for the Go agent's package (same name, version 1.2.3, files under
   /usr/local/orchestrator-agent) and writes an operator configuration to
   /etc/orchestrator-agent.conf.json, as a host running the Go agent has; then installs
   the new .deb with plain ``dpkg -i`` (no tty, no --force-conf*): it must upgrade
   without a question, keep the operator's file byte for byte and make it the conffile.
4. Starts the installed daemon with its unit's ExecStart command line (with ``--host``
   under systemd when systemd is PID 1, else directly), checks the API, /metrics, /api/openapi.json and
   that neither the token nor a new file inside the package's directory shows up.
5. Reinstalls the same .deb (an upgrade): the configuration is kept.
6. Purges the package: nothing of it may remain (files, state, unit, byte code).

Needs root, overlayfs, unshare and the packages dpkg-dev, debhelper, dh-virtualenv,
help2man, python3-venv, python3-dev, build-essential, lintian (exit 77 without them; with
``--host`` also where the package, its configuration or its directories already exist: it
would purge them).  Exit 0 when every check passed, 1 otherwise; timings are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "orchestrator-agent"
CONFFILE = "/etc/orchestrator-agent.conf.json"
UNIT = "/lib/systemd/system/orchestrator-agent.service"
UNIT_LINK = "/etc/systemd/system/multi-user.target.wants/orchestrator-agent.service"
VENV = "/usr/lib/orchestrator-agent"
STATE = "/var/lib/orchestrator-agent"
MAN_PAGE = "/usr/share/man/man8/orchestrator-agent.8.gz"
CLI = "/usr/bin/orchagent"
CLI_MAN_PAGE = "/usr/share/man/man1/orchagent.1.gz"
GO_AGENT_DIR = "/usr/local/orchestrator-agent"
TOOLS = ("dpkg-buildpackage", "dh", "dh_virtualenv", "help2man", "lintian")
SKIP = 77
#: What the install, run, upgrade and purge write to (dpkg's database is under /var):
#: copy-on-write in the private namespace.  Symbolic links (merged /usr) are left alone.
PRIVATE_DIRS = ("/etc", "/usr", "/var", "/lib", "/opt")


class Failed(Exception):
    """A check failed; the message says which and what was seen."""


def step(message: str) -> None:
    print(f"--- {message}", flush=True)


def run(argv, cwd=None, check=True, stdin=subprocess.DEVNULL, log=None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, stdin=stdin, capture_output=True, text=True)
    if log is not None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(argv)}\n{result.stdout}{result.stderr}\n")
    if check and result.returncode != 0:
        raise Failed(f"{shlex.join(argv)} exited with {result.returncode}:\n"
                     f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result


def package_status() -> str:
    result = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def preconditions(host: bool) -> str | None:
    """Why this machine can't run the test, or None."""
    if os.geteuid() != 0:
        return "needs root (dpkg -i / --purge)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install dpkg-dev debhelper dh-virtualenv help2man python3-venv python3-dev build-essential lintian)"
    if shutil.which("git") is None or run(["git", "rev-parse", "--is-inside-work-tree"], cwd=REPO,
                                           check=False).returncode != 0:
        return "not a git checkout: the build copies the files git lists"
    if not host:
        if shutil.which("unshare") is None:
            return "no unshare (util-linux) for the private mount namespace"
        with open("/proc/filesystems", encoding="ascii") as fh:
            if not re.search(r"\boverlay$", fh.read(), re.M):
                return "no overlayfs in this kernel for the private view (modprobe overlay)"
        return None
    status = package_status()
    if status and "not-installed" not in status:
        return f"package {PACKAGE} is already on this machine ({status}); not touching it"
    for path in (CONFFILE, VENV, STATE, GO_AGENT_DIR):
        if os.path.lexists(path):
            return f"{path} exists; not touching it"
    return None


# --- build ----------------------------------------------------------------------------------


def versions() -> tuple[str, str]:
    """(Debian version, upstream version); the latter must be setup.py's."""
    debian = run(["dpkg-parsechangelog", "-l", os.path.join(REPO, "debian/changelog"),
                  "-S", "Version"]).stdout.strip()
    upstream = debian.split(":", 1)[-1]
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as fh:
        match = re.search(r'version="([^"]+)"', fh.read())
    if not match or match.group(1) != upstream:
        raise Failed(f"debian/changelog's version {debian} does not match setup.py's "
                     f"{match.group(1) if match else '(none)'}")
    return debian, upstream


def copy_tree(destination: str) -> None:
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                 cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = os.path.join(REPO, name)
        if not os.path.isfile(source):
            continue  # deleted in the working tree but still in the index
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def build(work: str, upstream: str) -> tuple[str, str]:
    """Build; returns (.deb path, .changes path)."""
    source = os.path.join(work, f"{PACKAGE}-{upstream}")
    copy_tree(source)
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source,
        log=os.path.join(work, "build.log"))
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    deb = os.path.join(work, f"{PACKAGE}_{upstream}_{arch}.deb")
    changes = os.path.join(work, f"{PACKAGE}_{upstream}_{arch}.changes")
    if not os.path.exists(deb):
        raise Failed(f"dpkg-buildpackage made no {os.path.basename(deb)}: {sorted(os.listdir(work))}")
    return deb, changes


def lint(changes: str) -> str:
    out = run(["lintian", "--fail-on", "none", changes]).stdout
    tags = [line for line in out.splitlines() if re.match(r"^[EWIP]: ", line)]
    errors = [line for line in tags if line.startswith("E: ")]
    if errors:
        raise Failed("lintian errors:\n" + "\n".join(errors))
    counts = {kind: sum(1 for t in tags if t.startswith(kind + ":")) for kind in "EWIP"}
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


# --- install ----------------------------------------------------------------------------------


def go_agent_stand_in(work: str) -> str:
    """A .deb like the Go agent's (fpm-made, no /etc file), to upgrade from."""
    root = os.path.join(work, "go-agent")
    os.makedirs(os.path.join(root, "DEBIAN"))
    binary = os.path.join(root, GO_AGENT_DIR.lstrip("/"), "orchestrator-agent")
    os.makedirs(os.path.dirname(binary))
    with open(binary, "w", encoding="utf-8") as fh:
        fh.write("#!/bin/sh\necho 'the Go orchestrator-agent stand-in'\n")
    os.chmod(binary, 0o755)
    with open(os.path.join(root, "DEBIAN", "control"), "w", encoding="utf-8") as fh:
        fh.write(f"Package: {PACKAGE}\nVersion: 1.2.3\nArchitecture: all\n"
                 "Maintainer: test <test@example.org>\nDescription: Go agent stand-in\n")
    deb = os.path.join(work, "go-agent.deb")
    run(["dpkg-deb", "--root-owner-group", "--build", root, deb])
    return deb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_config(work: str, port: int, token: str) -> bytes:
    """What an operator of the Go agent has in /etc: original keys, plus ours for the test."""
    token_file = os.path.join(work, "token")
    with open(token_file, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.chmod(token_file, 0o600)
    config = {
        "HTTPPort": port,
        "ContinuousPollSeconds": 60,
        "ResubmitAgentIntervalMinutes": 60,
        "AgentsServer": "",
        "MySQLServiceStatusCommand": "true",
        "CustomCommands": {"hello": "echo hello from the packaged agent"},
        "HTTPBindAddress": "127.0.0.1",
        "TokenFile": token_file,
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def check_installed(expected_config: bytes) -> None:
    status = package_status()
    if status != "install ok installed":
        raise Failed(f"after dpkg -i the package is {status!r}")
    version = run(["dpkg-query", "-W", "-f=${Version}", PACKAGE]).stdout
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    if f" {CONFFILE} " not in conffiles:
        raise Failed(f"{CONFFILE} is not a conffile: {conffiles!r}")
    with open(CONFFILE, "rb") as fh:
        if fh.read() != expected_config:
            raise Failed(f"{CONFFILE} is not the operator's file after installing {version}")
    leftovers = [p for p in (CONFFILE + ".dpkg-new", CONFFILE + ".dpkg-dist",
                             CONFFILE + ".dpkg-migrate", GO_AGENT_DIR) if os.path.lexists(p)]
    if leftovers:
        raise Failed(f"left after the upgrade: {leftovers}")
    for path in (UNIT, os.path.join(VENV, "bin", "twistd"), MAN_PAGE, CLI, CLI_MAN_PAGE, STATE):
        if not os.path.exists(path):
            raise Failed(f"{path} is missing after installation")
    usage = run([CLI, "--help"]).stdout
    if "usage: orchagent" not in usage:
        raise Failed(f"{CLI} --help says {usage[:300]!r}")


# --- run ------------------------------------------------------------------------------------


def exec_start() -> list[str]:
    with open(UNIT, encoding="utf-8") as fh:
        lines = [l.split("=", 1)[1] for l in fh.read().splitlines() if l.startswith("ExecStart=")]
    if len(lines) != 1:
        raise Failed(f"{UNIT} has {len(lines)} ExecStart lines")
    argv = shlex.split(lines[0])
    expected = [os.path.join(VENV, "bin", "twistd"), "--nodaemon", "--pidfile=", PACKAGE,
                "--config", CONFFILE]
    if argv != expected:
        raise Failed(f"ExecStart is {argv}, expected {expected}")
    return argv


def under_systemd() -> bool:
    return os.path.isdir("/run/systemd/system")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def wait_listening(port: int, alive, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive():
            raise Failed("the installed daemon exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise Failed(f"the installed daemon is not listening on {port} after {seconds:.0f}s")


def check_api(port: int, token: str) -> None:
    base = f"http://127.0.0.1:{port}"
    expectations = [
        ("/api/hostname", 200, lambda body: isinstance(json.loads(body), str)),
        (f"/api/mysql-port?token=not-{token}", 500,
         lambda body: json.loads(body)["Message"] == "Invalid token"),
        (f"/api/custom-commands/hello?token={token}", 200,
         lambda body: json.loads(body)["Message"] == "hello from the packaged agent\n"),
        ("/api/status", 200, lambda body: json.loads(body) == "OK"),
        ("/api/openapi.json", 200, lambda body: json.loads(body)["openapi"].startswith("3.")),
        ("/metrics", 500, lambda body: json.loads(body)["Message"] == "Invalid token"),
        (f"/metrics?token={token}", 200,
         lambda body: 'orchagent_commands_total{command="shell"} 1.0' in body
         and 'endpoint="/api/custom-commands/<path:cmd>"' in body),
    ]
    for path, code, good in expectations:
        status, _, body = http_get(base + path)
        shown = path.replace(token, "<token>")
        if status != code or not good(body):
            raise Failed(f"GET {shown}: {status} {body[:500]!r}, expected {code}")
        print(f"    GET {shown} -> {status}")


def files_written_since(directory: str, since: float) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.lstat(path).st_mtime > since:
                found.append(path)
    return found


def run_daemon(port: int, token: str, work: str) -> None:
    argv = exec_start()
    started = time.time()
    if under_systemd():
        step("systemd is PID 1: the service started from postinst; checking it")
        run(["systemctl", "restart", PACKAGE])
        wait_listening(port, lambda: run(["systemctl", "is-active", PACKAGE], check=False).returncode == 0)
        try:
            check_api(port, token)
        finally:
            run(["systemctl", "stop", PACKAGE])
        output = run(["journalctl", "-u", PACKAGE, "--no-pager", "-o", "cat"], check=False).stdout
    else:
        step(f"systemd is not PID 1: running the unit's ExecStart: {shlex.join(argv)}")
        log_path = os.path.join(work, "daemon.log")
        with open(log_path, "wb") as log:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_listening(port, lambda: child.poll() is None)
            check_api(port, token)
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                code = child.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise Failed("the installed daemon ignored SIGTERM for 15 s") from None
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            output = fh.read()
        # twistd stops cleanly, then ends by the same signal (systemd counts it as clean).
        if code not in (0, -signal.SIGTERM) or "Server Shut Down." not in output:
            raise Failed(f"the installed daemon did not stop cleanly on SIGTERM (exit {code}):\n"
                         + output[-2000:])
    if token in output:
        raise Failed("the token appears in the daemon's log")
    if "token=***" not in output:
        raise Failed("the access log shows no redacted request:\n" + output[-2000:])
    written = files_written_since(VENV, started)
    if written:
        raise Failed(f"the daemon wrote into the package's directory: {written[:10]}")


# --- the private view ------------------------------------------------------------------------


def make_private(layers: str) -> None:
    """Give this process's mount namespace (unshare'd by the caller) its own view of the
    system: each of PRIVATE_DIRS an overlay whose writes go to a tmpfs on ``layers``; the
    package and its paths removed from that view (the machine keeps them); systemd out
    of sight (it could not see units installed here), so maintainer scripts do not call
    it and the daemon runs as its unit's ExecStart.  Everything goes with the namespace."""
    os.makedirs(layers, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "mode=0700", "orchagent-deb-test", layers])
    for directory in PRIVATE_DIRS:
        if os.path.islink(directory) or not os.path.isdir(directory):
            continue
        upper = os.path.join(layers, directory.strip("/"), "upper")
        scratch = os.path.join(layers, directory.strip("/"), "work")
        os.makedirs(upper)
        os.makedirs(scratch)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={directory},upperdir={upper},workdir={scratch}", directory])
    if os.path.isdir("/run/systemd"):
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "orchagent-deb-test", "/run/systemd"])
    if package_status() and "not-installed" not in package_status():
        step(f"{PACKAGE} is installed on this machine: purging it from the private view")
        run(["dpkg", "--purge", PACKAGE])
    for path in (CONFFILE, VENV, STATE, GO_AGENT_DIR):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def in_private_namespace(work: str, deb: str) -> int:
    """Steps 3 to 6 in a child in a private mount namespace (see :func:`make_private`)."""
    sys.stdout.flush()
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                           sys.executable, os.path.abspath(__file__), "--private-phase", work, deb],
                          stdin=subprocess.DEVNULL).returncode


# --- remove ------------------------------------------------------------------------------------


def purge() -> None:
    result = run(["dpkg", "--purge", PACKAGE])
    noise = [l for l in (result.stdout + result.stderr).splitlines()
             if "warning" in l.lower() or "not empty" in l]
    if noise:
        raise Failed("dpkg --purge complained:\n" + "\n".join(noise))
    remains = [p for p in (VENV, STATE, CONFFILE, UNIT, UNIT_LINK, MAN_PAGE, CLI, CLI_MAN_PAGE,
                           GO_AGENT_DIR) if os.path.lexists(p)]
    remains += [CONFFILE + suffix for suffix in (".dpkg-new", ".dpkg-dist", ".dpkg-old", ".dpkg-migrate")
                if os.path.lexists(CONFFILE + suffix)]
    if remains:
        raise Failed(f"left after purge: {remains}")
    if package_status() and "not-installed" not in package_status():
        raise Failed(f"after purge the package is {package_status()!r}")


def clean_up() -> None:
    """After a failure: remove whatever this test put on the machine (preconditions()
    made sure none of it was there before)."""
    if package_status() and "not-installed" not in package_status():
        run(["dpkg", "--purge", PACKAGE], check=False)
    for suffix in ("", ".dpkg-new", ".dpkg-dist", ".dpkg-old", ".dpkg-migrate"):
        if os.path.lexists(CONFFILE + suffix):
            os.unlink(CONFFILE + suffix)


def install_run_purge(work: str, deb: str, timings: dict[str, float]) -> None:
    """Steps 3 to 6; raises Failed.  Puts back nothing on success (purge removed it all)."""
    touched = False
    try:
        t0 = time.monotonic()
        step("installing the Go agent stand-in 1.2.3 and an operator configuration")
        port, token = free_port(), hashlib.sha256(os.urandom(32)).hexdigest()
        config = operator_config(work, port, token)
        touched = True
        run(["dpkg", "-i", go_agent_stand_in(work)])
        with open(CONFFILE, "wb") as fh:
            fh.write(config)
        step(f"upgrading to {os.path.basename(deb)} with plain dpkg -i")
        run(["dpkg", "-i", deb])
        check_installed(config)
        run_daemon(port, token, work)
        step("reinstalling the same package: the configuration stays")
        run(["dpkg", "-i", deb])
        check_installed(config)
        step("purging")
        purge()
        touched = False
        timings["install, run, purge"] = time.monotonic() - t0
    finally:
        if touched:
            clean_up()


def private_phase(work: str, deb: str) -> int:
    """In the namespace :func:`in_private_namespace` made: the private view, then steps 3-6."""
    timings: dict[str, float] = {}
    try:
        make_private(os.path.join(work, "layers"))
        install_run_purge(work, deb, timings)
    except Failed as e:
        print(f"FAILED: {e}")
        return 1
    print("    private view: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.items()))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the build directory")
    parser.add_argument("--host", action="store_true",
                        help="install, run and purge on this machine itself, not in a private view")
    parser.add_argument("--private-phase", nargs=2, metavar=("WORK", "DEB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.private_phase:
        return private_phase(*args.private_phase)
    reason = preconditions(args.host)
    if reason:
        print(f"SKIP: {reason}")
        return SKIP
    work = tempfile.mkdtemp(prefix="orchagent-deb-")
    timings = {}
    try:
        t0 = time.monotonic()
        debian_version, upstream = versions()
        step(f"building {PACKAGE} {debian_version} in {work}")
        deb, changes = build(work, upstream)
        timings["build"] = time.monotonic() - t0
        step(f"built {os.path.basename(deb)} ({os.path.getsize(deb) // 1024} KiB); lintian")
        t0 = time.monotonic()
        print(f"    lintian: {lint(changes)}")
        timings["lintian"] = time.monotonic() - t0
        if args.host:
            install_run_purge(work, deb, timings)
        else:
            t0 = time.monotonic()
            step("install, run, upgrade, purge in a private mount namespace")
            if in_private_namespace(work, deb) != 0:
                return 1
            timings["install, run, purge (private)"] = time.monotonic() - t0
    except Failed as e:
        print(f"FAILED: {e}")
        return 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("PASSED: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
