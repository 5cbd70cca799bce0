from setuptools import setup

setup(
    name="claudesrv",
    version="0.1.0",
    description="The Claude Code CLI behind an HTTP API, as a Twisted daemon (claudesrv, or twistd -n claudesrv)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # twisted/ and twisted/plugins/ have no __init__.py on purpose: Twisted owns those packages.
    packages=["claudesrv", "twisted.plugins"],
    package_dir={"": "."},
    entry_points={"console_scripts": ["claudesrv = claudesrv.main:main"]},  # the daemon in the foreground
    # process.py extends twisted.internet.process internals, checked on 26.10
    install_requires=["twisted[tls]>=26.10,<27", "klein", "treq", "service-identity", "prometheus_client"],
    extras_require={
        "test": ["mypy", "mypy-zope", "ruff", "httpx", "pydantic", "openai", "anthropic"],
        "dev": ["watchfiles"],
    },
)
