"""Test setup: 8 simulated CPU devices (set before JAX is imported) and parsed absl flags."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain / absl read flags; unparsed flags raise UnparsedFlagAccessError under pytest.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
