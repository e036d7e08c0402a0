from setuptools import find_packages, setup

setup(
    name="orchagent",
    version="0.1.0",
    description="orchestrator-agent replacement: MySQL host facts, snapshots and verified seeds",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The twistd plugin is found by scanning sys.path for twisted/plugins directories.  An
    # explicit root package_dir makes an editable install (pip install -e .) put the
    # project directory on sys.path (a static .pth), where twistd sees the plugin, instead
    # of an import hook it cannot see (tests/test_package_editable.py).
    package_dir={"": "."},
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/orchestrator_agent.py"], "orchagent.api": ["openapi.json"]},
    install_requires=[
        "twisted[tls]>=23.8",
        "klein>=23.5",
        "treq>=23.11",
        "zope.interface>=6",
        "service-identity>=21.1",
        "attrs>=23.1",
        "zstandard>=0.21",
        "blake3>=0.3",
        "xxhash>=3.0",
        "prometheus_client>=0.17",
    ],
    extras_require={"test": ["hypothesis>=6.80", "openapi-spec-validator>=0.7", "packaging>=23"]},
    entry_points={"console_scripts": ["orchagent = orchagent.cli.main:main"]},
)
