"""The README's worked plugin, run from the README's own text.

"Writing a plugin" shows a complete third-party plugin of a family the core does not know (SD
2.1 and SD-Turbo with an IP-Adapter). Each of its files is a fenced block after a
``<!-- plugin-file: PATH -->`` line. This module writes them into a temporary folder, imports
the plugin from there, and runs the README's own test file in this module's namespace: its
fixture registers the plugin, its classes subclass the contract mixins (which include a
one-cell ``adapterswap sweep --preset tiny`` at the declared tiny size), and its parity test
holds the engine's loop to ``StableDiffusionPipeline.__call__``. A README edit that breaks the
example fails here.
"""

from __future__ import annotations

import atexit
import re
import shutil
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_FILE = re.compile(r"^<!-- plugin-file: (\S+) -->\n```(\w+)\n(.*?)^```$", re.S | re.M)


def plugin_files(text: str) -> dict[str, str]:
    """``{path: content}`` of the worked plugin's files in the README's "Writing a plugin"."""
    section = text.split("\n## Writing a plugin\n", 1)[1].split("\n## ", 1)[0]
    return {path: body for path, _, body in _FILE.findall(section)}


FILES = plugin_files(README.read_text(encoding="utf-8"))
_ROOT = Path(tempfile.mkdtemp(prefix="adapterswap-readme-plugin-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)  # the written files, after the run
for _path, _body in FILES.items():
    (_ROOT / _path).parent.mkdir(parents=True, exist_ok=True)
    (_ROOT / _path).write_text(_body, encoding="utf-8")
sys.path.insert(0, str(_ROOT))
_TESTS = "tests/test_sd21.py"
exec(compile(FILES[_TESTS], f"README.md ({_TESTS})", "exec"), globals())  # noqa: S102


def test_the_readme_shows_the_whole_plugin() -> None:
    """The four files: packaging with the entry point, the plugin, its tiny builders, tests."""
    assert sorted(FILES) == ["adapterswap_sd21/plugin.py", "adapterswap_sd21/tiny.py",
                             "pyproject.toml", "tests/test_sd21.py"]
    assert 'sd21 = "adapterswap_sd21.plugin"' in FILES["pyproject.toml"]
    module = sys.modules["adapterswap_sd21.plugin"]
    assert Path(module.__file__).is_relative_to(_ROOT)  # the README's text, not a copy
