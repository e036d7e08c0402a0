"""A plain editable install (``pip install -e .``, no ``editable_mode=compat``) gives a
``twistd`` that knows the orchestrator-agent plugin.

twistd finds plugins by scanning sys.path for ``twisted/plugins`` directories; setuptools'
default editable install puts an import hook in place of a path entry unless the layout
asks for a path (setup.py's ``package_dir``).  This builds a fresh venv, installs a copy
of the project into it the way a developer would, and asks its twistd.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys

from twisted.trial import unittest

from tests.support.daemon import REPO_ROOT

TIMEOUT = 120
TWISTD_HELP = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _ignore(directory, names):
    return [n for n in names if n in ("__pycache__", "dropin.cache") or n.endswith(".pyc")]


class EditableInstallTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.project = os.path.join(self.base, "project")
        os.makedirs(self.project)
        for name in ("setup.py", "README.md"):
            shutil.copy(os.path.join(REPO_ROOT, name), self.project)
        for name in ("orchagent", "twisted"):
            shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(self.project, name),
                            ignore=_ignore)
        self.venv = os.path.join(self.base, "venv")
        self.python = os.path.join(self.venv, "bin", "python")

    def run_checked(self, argv, **kwargs):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                timeout=TIMEOUT, cwd="/", env=env, **kwargs)
        self.assertEqual(result.returncode, 0, result.stdout.decode(errors="replace")[-3000:])
        return result.stdout.decode(errors="replace")

    def test_twistd_lists_the_plugin_after_pip_install_e(self):
        self.run_checked([sys._base_executable, "-m", "venv", self.venv])
        self.run_checked([self.python, "-m", "pip", "install", "-q", "--no-deps",
                          "--disable-pip-version-check", "-e", self.project])
        # The dependencies are this test run's, added only now so that pip never saw (and
        # could never touch) the packages of the environment running the tests.
        purelib = self.run_checked([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
        with open(os.path.join(purelib, "zz-test-dependencies.pth"), "w") as fh:
            fh.write("\n".join(site.getsitepackages()) + "\n")
        where = self.run_checked([self.python, "-c", "import orchagent; print(orchagent.__file__)"])
        self.assertTrue(where.strip().startswith(self.project + os.sep), where)
        listing = self.run_checked([self.python, "-c", TWISTD_HELP, "--help"])
        self.assertIn("orchestrator-agent", listing)
        help_text = self.run_checked([self.python, "-c", TWISTD_HELP, "orchestrator-agent", "--help"])
        self.assertIn("--config", help_text)
