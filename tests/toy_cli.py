"""Run the adapterswap CLI with the toy plugin registered (subprocess tests: kill -9, locks).

``TOY_SLEEP`` (seconds) slows every denoiser call so a test can kill the process mid-sweep.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from toy_plugin import ToyBackbone, ToyPlugin  # noqa: E402

from adapterswap import plugins  # noqa: E402
from adapterswap.cli import main  # noqa: E402

if os.environ.get("TOY_SLEEP"):
    delay = float(os.environ["TOY_SLEEP"])
    original = ToyBackbone.predict

    def slow_predict(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        time.sleep(delay)
        return original(self, *args, **kwargs)

    ToyBackbone.predict = slow_predict

plugins.register_plugin(ToyPlugin(), name="toy-plugin")
main(sys.argv[1:], prog_name="adapterswap")
