"""Test support shared by every test module; use these rather than private copies.

* :mod:`tests.support.daemon` — the real agent (``twistd -n orchestrator-agent``) as a
  child process: config dict in, base URL, token, log and ``get()`` out; netns-capable.
* :mod:`tests.support.orchestrator` — a stand-in orchestrator: the agents server
  (submit-agent, agent-ping) and orchestrator's GetAgent calls with v1 shape checks.
* :mod:`tests.support.certs` — a throwaway CA issuing server/client certificates, and
  HTTPS treq clients that trust it.
* :mod:`tests.support.mariadb` — a real throwaway MariaDB server.
* :mod:`tests.support.netns` — two network namespaces joined by a veth pair.
* :mod:`tests.support.btrfs` — a real btrfs on a loop file.
* :mod:`tests.support.fakes` — expectation fakes for commands that cannot run here (LVM).
"""
