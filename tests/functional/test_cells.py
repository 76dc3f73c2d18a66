"""Each functional cell against its torch.nn cell: outputs, carries and gradients in float64."""

from __future__ import annotations

import ast
import importlib
import io
import pathlib
import re
import tokenize
import types

import pytest
import torch
from torch.func import grad

import functional
from functional import LSTMCarry

ARCHS = list(functional.ARCHS)
NN_ARCHS = [arch for arch in ARCHS if functional.ARCHS[arch].layered]  # those with a torch.nn cell to check against
SIZES = [(1, 1, 1), (3, 5, 2), (8, 4, 3), (6, 8, 4)]  # (input_size, hidden_size, batch)
OUT_TOL, GRAD_TOL = 1e-12, 1e-10
F64 = torch.float64


def random_carry(arch: str, batch_shape: tuple[int, ...], hidden_size: int, generator: torch.Generator):
    def draw():
        return torch.randn(*batch_shape, hidden_size, generator=generator, dtype=F64)

    return LSTMCarry(draw(), draw()) if arch == "lstm" else draw()


def torch_step(arch: str, module, carry, x):
    """The torch.nn cell's step, returned as the functional (carry, y)."""
    if arch == "lstm":
        h, c = module(x, tuple(carry)) if carry is not None else module(x)
        return LSTMCarry(h, c), h
    h = module(x, carry) if carry is not None else module(x)
    return h, h


def setup(oracle, arch, input_size, hidden_size, batch_shape, bias=True, seed=0):
    """The torch.nn cell and its params; for an arch without one (sru) the module is None and params come from init_params."""
    torch.manual_seed(seed)
    if arch in oracle.NN_MODULES:
        module = oracle.nn_cell(arch, input_size, hidden_size, bias=bias, dtype=F64)
        params = oracle.params_of(module)
    else:
        module, params = None, functional.init_params(arch, input_size, hidden_size, dtype=F64)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch_shape, input_size, generator=generator, dtype=F64)
    carry = random_carry(arch, batch_shape, hidden_size, generator)
    return module, params, x, carry, generator


def test_every_arch_has_a_torch_counterpart(oracle):
    """Every layered arch is a torch.nn one (the hand-written table); the only other is sru (checked against the sru package)."""
    assert set(NN_ARCHS) == set(oracle.NN_MODULES)
    assert set(ARCHS) - set(NN_ARCHS) == {"sru"}
    for arch in ARCHS:
        assert functional.get_arch(arch).name == arch


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "I{}H{}B{}".format(*s))
@pytest.mark.parametrize("arch", NN_ARCHS)
def test_cell_outputs_match_torch(oracle, arch, sizes, bias, batched):
    input_size, hidden_size, batch = sizes
    batch_shape = (batch,) if batched else ()
    module, params, x, carry, _ = setup(oracle, arch, input_size, hidden_size, batch_shape, bias)
    cell = functional.get_arch(arch).cell
    with torch.no_grad():
        want_carry, want_y = torch_step(arch, module, carry, x)
    got_carry, got_y = cell(params, carry, x)
    assert type(got_carry) is type(want_carry)
    oracle.assert_close(got_y, want_y, OUT_TOL, "y")
    oracle.assert_close(got_carry, want_carry, OUT_TOL, "carry")
    assert got_y.shape == (*batch_shape, hidden_size)


@pytest.mark.parametrize("arch", NN_ARCHS)
def test_zero_initial_carry_matches_torch_default(oracle, arch):
    module, params, x, _, _ = setup(oracle, arch, 4, 6, (3,))
    carry = functional.initial_carry(arch, (3,), 6, dtype=F64)
    with torch.no_grad():
        want_carry, want_y = torch_step(arch, module, None, x)  # torch: hx=None means zeros
    got_carry, got_y = functional.get_arch(arch).cell(params, carry, x)
    oracle.assert_close(got_y, want_y, OUT_TOL, "y")
    oracle.assert_close(got_carry, want_carry, OUT_TOL, "carry")


@pytest.mark.parametrize("arch", ["rnn_tanh", "rnn_relu"])
def test_rnn_cell_nonlinearity_keyword(oracle, arch):
    """`rnn_cell(..., nonlinearity=...)` is the same function the registry binds."""
    module, params, x, carry, _ = setup(oracle, arch, 3, 5, (2,))
    with torch.no_grad():
        want_carry, _ = torch_step(arch, module, carry, x)
    got_carry, got_y = functional.rnn_cell(params, carry, x, nonlinearity=arch.removeprefix("rnn_"))
    oracle.assert_close(got_carry, want_carry, OUT_TOL, "carry")
    assert torch.equal(got_carry, got_y)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "I{}H{}B{}".format(*s))
@pytest.mark.parametrize("arch", NN_ARCHS)
def test_cell_gradients_match_torch(oracle, arch, sizes, bias, batched):
    """d<y, W_y> + <carry, W_c> w.r.t. params, carry and x: torch.func.grad vs torch.autograd."""
    input_size, hidden_size, batch = sizes
    batch_shape = (batch,) if batched else ()
    module, params, x, carry, generator = setup(oracle, arch, input_size, hidden_size, batch_shape, bias)
    y_weight = torch.randn(*batch_shape, hidden_size, generator=generator, dtype=F64)
    carry_weight = random_carry(arch, batch_shape, hidden_size, generator)

    def objective(new_carry, y):
        return (y * y_weight).sum() + sum((a * w).sum() for a, w in zip(oracle.leaves(new_carry), oracle.leaves(carry_weight)))

    cell = functional.get_arch(arch).cell
    got_params, got_carry, got_x = grad(lambda p, c, v: objective(*cell(p, c, v)), argnums=(0, 1, 2))(params, carry, x)

    x_leaf = x.clone().requires_grad_()
    carry_leaf = type(carry)(*(c.clone().requires_grad_() for c in carry)) if arch == "lstm" else carry.clone().requires_grad_()
    names = [name for name, _ in module.named_parameters()]
    inputs = [*module.parameters(), x_leaf, *oracle.leaves(carry_leaf)]
    want = torch.autograd.grad(objective(*torch_step(arch, module, carry_leaf, x_leaf)), inputs)

    assert list(got_params) == list(params)
    oracle.assert_close([got_params[name] for name in names], list(want[: len(names)]), GRAD_TOL, "grad params")
    oracle.assert_close(got_x, want[len(names)], GRAD_TOL, "grad x")
    oracle.assert_close(oracle.leaves(got_carry), list(want[len(names) + 1 :]), GRAD_TOL, "grad carry")


@pytest.mark.parametrize("arch", NN_ARCHS)
def test_any_batch_shape_equals_flattened_batch(oracle, arch):
    module, params, x, carry, _ = setup(oracle, arch, 5, 4, (2, 3))
    cell = functional.get_arch(arch).cell
    got_carry, got_y = cell(params, carry, x)
    flat = (lambda t: t.reshape(6, t.shape[-1]))
    flat_carry = LSTMCarry(*map(flat, carry)) if arch == "lstm" else flat(carry)
    want_carry, want_y = cell(params, flat_carry, flat(x))
    assert got_y.shape == (2, 3, 4)
    oracle.assert_close(got_y.reshape(6, 4), want_y, OUT_TOL, "y")
    oracle.assert_close([leaf.reshape(6, -1) for leaf in oracle.leaves(got_carry)], oracle.leaves(want_carry), OUT_TOL, "carry")
    with torch.no_grad():  # and torch agrees on the flattened batch
        torch_carry, _ = torch_step(arch, module, flat_carry, flat(x))
    oracle.assert_close(got_y.reshape(6, 4), oracle.leaves(torch_carry)[0], OUT_TOL, "y vs torch")


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cell_does_not_mutate_its_inputs(oracle, arch, batched):
    _, params, x, carry, _ = setup(oracle, arch, 4, 3, (2,) if batched else ())
    before = ({k: v.clone() for k, v in params.items()}, [c.clone() for c in oracle.leaves(carry)], x.clone())
    new_carry, y = functional.get_arch(arch).cell(params, carry, x)
    # and the results do not alias the inputs (writing into them leaves the inputs alone)
    y.add_(1.0)
    for leaf in oracle.leaves(new_carry):
        leaf.add_(1.0)
    assert list(params) == list(before[0])
    assert all(torch.equal(params[k], before[0][k]) for k in params)
    assert all(torch.equal(a, b) for a, b in zip(oracle.leaves(carry), before[1], strict=True))
    assert torch.equal(x, before[2])


# --- functional/ must not depend on torch.nn -------------------------------------------------------

FUNCTIONAL_DIR = pathlib.Path(functional.__file__).resolve().parent
FUNCTIONAL_FILES = sorted(FUNCTIONAL_DIR.glob("*.py"))
TORCH_NN_PATTERNS = [
    re.compile(r"\bimport\s+torch\s*\.\s*nn\b"),  # import torch.nn (as ...)
    re.compile(r"\bfrom\s+torch\s*\.\s*nn\b"),  # from torch.nn(.x) import ...
    re.compile(r"\bfrom\s+torch\s+import\b[^\n]*\bnn\b"),  # from torch import nn / (Tensor, nn)
    re.compile(r"\btorch\s*\.\s*nn\b"),  # torch.nn.Anything
]
_DROPPED = {tokenize.STRING, tokenize.COMMENT} | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())


def code_without_strings_and_comments(source: str) -> str:
    """The code tokens, one logical line per text line; string literals (docstrings too) and comments dropped."""
    parts = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NEWLINE:
            parts.append("\n")
        elif tok.type not in _DROPPED and tok.type != tokenize.NL:
            parts.append(tok.string)
    return " ".join(parts)


def test_functional_files_are_found():
    names = {path.name for path in FUNCTIONAL_FILES}
    assert {"__init__.py", "validate.py", "params.py", "rnn.py", "lstm.py", "gru.py", "scan.py", "registry.py", "layers.py", "stack.py", "sru.py"} <= names


def torch_nn_uses(source: str) -> list[str]:
    """Every way `source` reaches torch.nn: regexes over its code (strings and comments dropped) and its AST."""
    code = code_without_strings_and_comments(source)
    found = [match.group(0) for pattern in TORCH_NN_PATTERNS for match in pattern.finditer(code)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name == "torch.nn" or a.name.startswith("torch.nn.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "torch.nn" or module.startswith("torch.nn."):
                found.append(f"from {module} import ...")
            if module == "torch" and any(a.name == "nn" for a in node.names):
                found.append("from torch import nn")
        elif isinstance(node, ast.Attribute) and node.attr == "nn":  # torch.nn, or an aliased torch: T.nn
            found.append(f"line {node.lineno}: .nn")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("__import__", "import_module"):
            found += [f"import of {a.value}" for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("torch.nn")]
    return found


@pytest.mark.parametrize("path", FUNCTIONAL_FILES, ids=lambda p: p.name)
def test_functional_source_does_not_use_torch_nn(path):
    assert torch_nn_uses(path.read_text()) == [], f"{path.name} uses torch.nn"


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch.nn\n",
        "import torch.nn as nn\n",
        "import torch.nn.functional as F\n",
        "from torch.nn import LSTM\n",
        "from torch.nn.utils import rnn\n",
        "from torch import nn\n",
        "from torch import Tensor, nn as tnn\n",
        "from torch import (Tensor,\n    nn)\n",
        "import torch\ny = torch.nn.functional.relu(x)\n",
        "import torch\ny = torch . nn . Linear\n",
        "import torch as T\ny = T.nn.Linear\n",
        "import importlib\nm = importlib.import_module('torch.nn')\n",
    ],
)
def test_the_torch_nn_check_catches_each_form(snippet):
    assert torch_nn_uses(snippet), snippet


def test_the_torch_nn_check_ignores_docstrings_and_comments():
    source = '"""As `torch.nn.GRUCell`."""\n# from torch import nn\nimport torch\nx = f"as torch.nn.{1}"\ny = torch.tanh\n'
    assert torch_nn_uses(source) == []


def test_functional_modules_hold_nothing_from_torch_nn():
    """At run time: no global of any functional.* module is torch.nn or comes from it."""
    modules = [importlib.import_module(f"functional.{path.stem}") for path in FUNCTIONAL_FILES if path.stem != "__init__"] + [functional]
    assert len(modules) == len(FUNCTIONAL_FILES)
    for module in modules:
        for name, value in vars(module).items():
            origin = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None) or ""
            assert not str(origin).startswith("torch.nn"), f"{module.__name__}.{name} comes from {origin}"
