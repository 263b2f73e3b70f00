"""Package discovery for the one `leaktap` namespace mapped onto the top-level folders.

pyproject.toml cannot map a namespace prefix onto folders *and* discover the
subpackages below them, so the list is computed here: a new subpackage (any
folder with an __init__.py) under bpf/, controller/ or analytics/ is in the
wheel without anyone remembering to list it. tests/packaging checks the wheel.
"""

from setuptools import Extension, find_packages, setup

TOP_LEVEL = {
    "leaktap.bpf": "bpf",
    "leaktap.controller": "controller",
    "leaktap.analytics": "analytics",
}

packages = []
for name, folder in TOP_LEVEL.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

# The fingerprint prefilter in C (issue 15.3): optional, so that a host without gcc or
# libssl-dev still installs; fingerprints.py then uses its numpy path (and says so).
PREFILTER = Extension("leaktap.analytics.plaintext._prefilter",
                      sources=["analytics/plaintext/_prefilter.c"], libraries=["crypto"],
                      extra_compile_args=["-O2"], optional=True)

setup(packages=packages, package_dir=TOP_LEVEL, ext_modules=[PREFILTER])
