"""
Packaging for the broker.

The Twisted plugin ships as C{twisted/plugins/broker_plugin.py} (no
C{__init__.py} there, so Twisted's own plugin package is extended, not
shadowed).  The embedded default configuration C{etc/broker.toml} is copied
into the built package as C{broker/_etc/broker.toml}, so C{twistd broker}
finds it after a plain C{pip install .}; an editable install reads C{etc/}
directly.
"""

import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_etc(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "broker", "_etc")
        os.makedirs(target, exist_ok=True)
        shutil.copy(os.path.join("etc", "broker.toml"), target)


def version():
    """
    C{broker.__version__}, read (not imported: the dependencies may not be
    installed yet) from broker/__init__.py, its one source.
    """
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "broker", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="broker",
    version=version(),
    description="One Twisted process routing TCP, UDP, WebSocket and HTTP(S) "
                "through one core: Web PubSub, IoT, peer groups, eCDN.",
    python_requires=">=3.11",
    # An explicit root package_dir makes "pip install -e ." use a plain .pth
    # (the checkout on sys.path), which Twisted's plugin discovery needs;
    # the import-hook style of editable install hides twisted/plugins/.
    package_dir={"": "."},
    packages=find_packages(include=["broker", "broker.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted[tls]>=24.3",
        "autobahn>=23.6",
        "pyopenssl>=24.0",
        "service-identity>=24.1",
        "treq>=23.11",
        "zope.interface>=6.0",
        "cryptography>=42",
        "PyJWT>=2.8",
        "prometheus-client>=0.20",
        # Cluster mode's engine and stores (broker/cluster/).  hiredis is
        # the Redis project's C reply parser, which txredisapi uses when it
        # is installed: its pure-Python parser yields to the reactor after
        # every bulk reply, so a node could read only a few hundred bus
        # messages a second (bench/cluster.py).
        "txredisapi>=1.4.10",
        "hiredis>=2.0",
        # The Web PubSub protobuf subprotocols (broker/webpubsub/protobuf.py):
        # Google's runtime (its upb C core) encodes and decodes the messages
        # of broker/webpubsub/proto/.  The committed webpubsub_pb2.py was
        # generated for 7.35 and checks the runtime is that major version,
        # at least that release.
        "protobuf>=7.35.1,<8",
    ],
    package_data={"broker.peergroups": ["web/*.js", "web/*.html"],
                  "broker.admin": ["static/*.html", "static/*.js", "static/*.css",
                                   "static/*.svg"]},
    cmdclass={"build_py": build_py_with_etc},
    zip_safe=False,
)
