"""Documentation and packaging files that must agree with the code.

- docs/configuration.md's key tables are FIELDS (regenerate with
  ``python3 docs/config_table.py``), and its prose names only real keys;
- the man page lists exactly the plugin's command-line options;
- debian/: the version is setup.py's, the pinned dependencies satisfy install_requires,
  the packaged default configuration loads cleanly, the unit runs what the issue asks.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex

from packaging.requirements import Requirement
from twisted.trial import unittest

from orchagent import config as config_module
from orchagent.config import FIELDS
from orchagent.tap import Options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path: str) -> str:
    with open(os.path.join(REPO, *path), encoding="utf-8") as fh:
        return fh.read()


def setup_py() -> str:
    return read("setup.py")


def load_config_table():
    spec = importlib.util.spec_from_file_location("config_table", os.path.join(REPO, "docs", "config_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ConfigurationDocTestCase(unittest.TestCase):
    def test_key_tables_are_fields(self):
        table = load_config_table()
        _, body, _ = table.split(read("docs", "configuration.md"))
        self.assertEqual(body, table.tables(FIELDS),
                         "docs/configuration.md disagrees with orchagent/config.py FIELDS: "
                         "run python3 docs/config_table.py")

    def test_tables_cover_every_key_once(self):
        table = load_config_table()
        _, body, _ = table.split(read("docs", "configuration.md"))
        keys = re.findall(r"^\| `([A-Za-z]+)` \|", body, re.M)
        self.assertEqual(sorted(keys), sorted(f.key for f in FIELDS))

    def test_prose_names_only_real_keys(self):
        table = load_config_table()
        known = {f.key for f in FIELDS}
        for name in ("configuration.md", "migrating.md", "tls-and-tokens.md"):
            text = read("docs", name)
            if name == "configuration.md":
                head, _, tail = table.split(text)
                text = head + tail
            prose = re.sub(r"```.*?```", "", text, flags=re.S)
            named = set(re.findall(r"`([A-Z][a-z]+(?:[A-Z][A-Za-z]*)+)`", prose))
            self.assertEqual(sorted(named - known), [], f"docs/{name} names unknown keys")


class ManPageTestCase(unittest.TestCase):
    def options_section(self) -> str:
        page = read("docs", "orchestrator-agent.8")
        return page.split(".SH OPTIONS", 1)[1].split(".SH ", 1)[0]

    def test_lists_exactly_the_plugins_options(self):
        options = Options()
        expected_long = {"help", "version"} | {o[0] for o in options.optParameters} | {
            o[0] for o in getattr(options, "optFlags", [])}
        expected_short = {o[1] for o in options.optParameters + list(getattr(options, "optFlags", [])) if o[1]}
        section = self.options_section()
        self.assertEqual(set(re.findall(r"\\-\\-([a-z][a-z-]*)", section)), expected_long)
        self.assertEqual(set(re.findall(r"(?<![\\-])\\-([a-z])\b", section)), expected_short)

    def test_synopsis_is_the_units_command(self):
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.read_string(read("debian", "orchestrator-agent.service"))
        command = unit["Service"]["ExecStart"]
        self.assertIn(command, read("docs", "orchestrator-agent.8").replace("\\-", "-"))


class DebianTestCase(unittest.TestCase):
    def test_version_is_setup_pys(self):
        first = read("debian", "changelog").splitlines()[0]
        match = re.match(r"^orchestrator-agent \((?:\d+:)?([^)-]+)\) ", first)
        self.assertIsNotNone(match, first)
        self.assertIn(f'version="{match.group(1)}"', setup_py())

    def test_pins_satisfy_install_requires(self):
        pins = {}
        for line in read("debian", "requirements.txt").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                requirement = Requirement(line)
                (spec,) = requirement.specifier
                self.assertEqual(spec.operator, "==", line)
                pins[_normal(requirement.name)] = spec.version
        install_requires = re.search(r"install_requires=\[(.*?)\]", setup_py(), re.S).group(1)
        for text in re.findall(r'"([^"]+)"', install_requires):
            requirement = Requirement(text)
            name = _normal(requirement.name)
            self.assertIn(name, pins, f"{text} of setup.py is not pinned in debian/requirements.txt")
            self.assertTrue(requirement.specifier.contains(pins[name], prereleases=True),
                            f"debian/requirements.txt pins {name}=={pins[name]}, setup.py wants {text}")

    def test_default_configuration_loads_cleanly(self):
        warnings = []
        config = config_module.load(os.path.join(REPO, "debian", "orchestrator-agent.conf.json"),
                                    warn=warnings.append)
        self.assertEqual(warnings, [])
        self.assertEqual((config.http_port, config.agents_server, config.state_dir),
                         (3002, "", "/var/lib/orchestrator-agent"))
        installed = read("debian", "orchestrator-agent.install").split()
        self.assertEqual(installed, ["debian/orchestrator-agent.conf.json", "etc"])

    def test_unit(self):
        unit = configparser.ConfigParser(interpolation=None, strict=False)
        unit.read_string(read("debian", "orchestrator-agent.service"))
        service = unit["Service"]
        self.assertEqual(shlex.split(service["ExecStart"]), [
            "/usr/lib/orchestrator-agent/bin/twistd", "--nodaemon", "--pidfile=",
            "orchestrator-agent", "--config", "/etc/orchestrator-agent.conf.json"])
        self.assertEqual(service["Restart"], "on-failure")
        self.assertEqual(service["StateDirectory"], "orchestrator-agent")
        self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")

    def test_listed_files_exist(self):
        for listing in ("orchestrator-agent.docs", "orchestrator-agent.manpages"):
            for name in read("debian", listing).split():
                self.assertTrue(os.path.isfile(os.path.join(REPO, name)), f"{listing}: {name}")

    def test_openapi_shipped_with_the_package(self):
        self.assertIn('"orchagent.api": ["openapi.json"]', setup_py())
        json.loads(read("orchagent", "api", "openapi.json"))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
