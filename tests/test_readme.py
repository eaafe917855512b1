"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_runs():
    block = next(b for b in python_blocks() if "class MLP" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    y, y_eval, state = namespace["y"], namespace["y_eval"], namespace["state"]
    model = namespace["model"]
    assert y.shape == (16, 1) and y_eval.shape == (16, 1)
    assert float(state.get(model.norm.state_index).var[0]) != 1.0
