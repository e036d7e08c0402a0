"""The Debian package, built and installed for real: runs packaging/deb_test.py.

About a minute on 2 cores (build ~30 s, lintian ~10 s, install/run/purge ~10 s).  The
install, run, upgrade and purge happen in a private mount namespace with copy-on-write
/etc, /usr and /var, where the package's paths do not exist: what this machine has (the
quick start's /var/lib/orchestrator-agent, an installed package) neither skips the test
nor is touched by it.  Skipped, with the script's reason, only when not root or when the
build tools, unshare or overlayfs are missing (apt-get install dpkg-dev debhelper
dh-virtualenv help2man python3-venv python3-dev build-essential lintian).
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor, utils
from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "packaging", "deb_test.py")
SKIP = 77


class DebianPackageTestCase(unittest.TestCase):
    timeout = 900

    async def test_build_install_run_purge(self):
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable, [SCRIPT], env=dict(os.environ), path=REPO, reactor=reactor)
        text = (out + err).decode("utf-8", "replace")
        if code == SKIP:
            raise unittest.SkipTest(text.strip().splitlines()[-1])
        self.assertEqual(code, 0, text[-6000:])
        self.assertIn("lintian: 0 E,", text)
        self.assertIn("PASSED", text)
