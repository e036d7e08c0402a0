"""The token hint file against another local user (#16 item 12).

Such a user can only act through the hint file's directory: by making names there in
advance (a file they keep open, a symlink to a root-owned file) or by writing there at
all.  Tests run as root; the "other user" is nobody (uid 65534).
"""

from __future__ import annotations

import os
import stat

from twisted.trial import unittest

from orchagent import token as token_module
from orchagent.errors import ConfigError
from orchagent.token import Token
from tests.support.daemon import start_daemon

NOBODY = 65534


class HintFileTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.dir = os.path.join(self.base, "run")
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "token")
        self.victim = os.path.join(self.base, "victim")
        with open(self.victim, "w") as fh:
            fh.write("root's file\n")
        self.token = Token.random()

    def assert_hint_written(self):
        st = os.lstat(self.path)
        self.assertTrue(stat.S_ISREG(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        with open(self.path) as fh:
            self.assertEqual(fh.read(), self.token.value + "\n")
        with open(self.victim) as fh:
            self.assertEqual(fh.read(), "root's file\n")

    def guessable_names(self) -> list[str]:
        """The names the hint was written through before: the pid's and its neighbours'."""
        pid = os.getpid()
        return [f".token.{p}.tmp" for p in range(pid - 3, pid + 4)] + ["token"]

    def test_symlinks_made_in_advance_are_not_followed(self):
        for name in self.guessable_names():
            os.symlink(self.victim, os.path.join(self.dir, name))
        self.token.write_hint(self.path)
        self.assert_hint_written()

    def test_a_file_made_and_held_open_in_advance_gets_nothing(self):
        """The other user's file at a guessable name, open for reading: the token must
        not be written into it."""
        held = []
        for name in self.guessable_names()[:-1]:
            path = os.path.join(self.dir, name)
            with open(path, "w"):
                pass
            os.chown(path, NOBODY, NOBODY)
            os.chmod(path, 0o666)
            held.append(os.open(path, os.O_RDONLY))
        self.addCleanup(lambda: [os.close(fd) for fd in held])
        self.token.write_hint(self.path)
        self.assert_hint_written()
        for fd in held:
            self.assertEqual(os.pread(fd, 1000, 0), b"")

    def test_a_guessed_temporary_name_is_not_followed(self):
        """Even a name guessed right (here: made predictable) holding a symlink is not
        opened: another name is drawn."""
        names = iter(["guessed", "guessed", "fresh"])
        self.patch(token_module.secrets, "token_hex", lambda n: next(names))
        os.symlink(self.victim, os.path.join(self.dir, ".token.guessed.tmp"))
        self.token.write_hint(self.path)
        self.assert_hint_written()
        self.assertEqual(sorted(os.listdir(self.dir)), [".token.guessed.tmp", "token"])

    def test_directories_others_can_write_to_are_refused(self):
        for mode, owner, why in ((0o1777, 0, "writable by others (mode 1777)"),
                                 (0o757, 0, "writable by others (mode 0757)"),
                                 (0o775, (0, NOBODY), f"writable by group {NOBODY} (mode 0775)"),
                                 (0o755, (NOBODY, 0), f"owned by uid {NOBODY}")):
            with self.subTest(mode=oct(mode)):
                uid, gid = owner if isinstance(owner, tuple) else (owner, owner)
                os.chown(self.dir, uid, gid)
                os.chmod(self.dir, mode)
                with self.assertRaises(ConfigError) as caught:
                    self.token.write_hint(self.path)
                self.assertIn(f"its directory {self.dir} is {why}", caught.exception.message)
                self.assertEqual(os.listdir(self.dir), [])
        os.chown(self.dir, 0, 0)
        os.chmod(self.dir, 0o775)  # group root: only root writes there
        self.token.write_hint(self.path)
        self.assert_hint_written()


class DaemonHintTests(unittest.TestCase):
    async def test_daemon_refuses_a_world_writable_hint_directory(self):
        directory = os.path.abspath(self.mktemp())
        hints = os.path.join(directory, "hints")
        os.makedirs(hints)
        os.chmod(hints, 0o1777)
        agent = await start_daemon(self, {"TokenHintFile": os.path.join(hints, "token")},
                                   wait=False, directory=directory)
        code = await agent.wait_exit()
        self.assertNotEqual(code, 0)
        self.assertIn(f"TokenHintFile {hints}/token: its directory {hints} is writable by others",
                      agent.output())
        self.assertEqual(os.listdir(hints), [])
