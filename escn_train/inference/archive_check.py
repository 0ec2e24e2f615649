"""Check a ``torch.export`` archive (``.pt2``) before torch reads it.

``torch.export.load`` turns strings of the archive into code: every symbolic shape
(``expr_str``) goes through ``sympy.sympify`` (Python ``eval``), the ``guards_code`` lines
are ``exec``-ed when the program becomes a module, operator names are resolved by
``getattr`` from ``torch`` (``torch.os.system`` resolves), and pickled payloads are read
with ``weights_only=False``. A file from escn-export holds none of that beyond plain
symbols, integer arithmetic, size guards and aten operators, so :func:`check_exported_archive`
refuses anything else without evaluating it: expressions are parsed with :mod:`ast` and
every node must be on a short allow-list. This is defence in depth: exported programs are
still code and need ``trusted=True`` (see :func:`escn_train.inference.loading.load_predictor`).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from typing import Any


class UnsafeModelError(ValueError):
    """An exported file holds something escn-export never writes and torch would run."""


#: sympy classes that ``sympy.srepr`` writes for shape expressions, and the functions
#: ``torch._export.serde.serialize`` offers its parser (``torch.utils._sympy.functions``).
SYMPY_FUNCTIONS = frozenset(
    """Symbol Integer Float Rational Add Mul Pow Max Min Abs Piecewise ExprCondPair
    Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan Eq Ne Lt Le Gt Ge
    And Or Not
    FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift
    PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat
    TruncToInt RoundToInt RoundDecimal ToFloat Identity""".split()
)
SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo"})
#: Keyword arguments of ``Symbol`` (assumptions) and ``Float``.
SYMPY_KEYWORDS = frozenset(
    """commutative integer real positive negative nonnegative nonpositive nonzero zero finite
    infinite rational irrational even odd prime composite complex imaginary extended_real
    extended_positive extended_negative extended_nonnegative extended_nonpositive extended_nonzero
    noninteger precision""".split()
)
POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
#: Names torch gives its shape symbols (s0, u3, zuf0, ...).
SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")
#: The string argument ``Symbol``, ``Float`` and ``Integer`` may take.
STRING_ARGUMENTS = {
    "Symbol": re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}"),
    "Float": re.compile(r"[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?|[+-]?inf|nan"),
    "Integer": re.compile(r"[+-]?[0-9]{1,20}"),
}
MAX_EXPRESSION_CHARS = 10_000
MAX_INT_DIGITS = 20
MAX_LITERAL_EXPONENT = 64

#: What the guard printer (``torch.utils._sympy.printers.PythonPrinter``) writes.
GUARD_FUNCTIONS = frozenset({"abs", "max", "min", "round", "IsNonOverlappingAndDenseIndicator"})
GUARD_MODULE_FUNCTIONS = {
    "math": frozenset("floor ceil trunc cos cosh acos sin sinh asin tan tanh atan log2 sqrt exp log".split()),
    "torch": frozenset("sym_float sym_int sym_max sym_min sym_not sym_ite _sym_sqrt".split()),
}
GUARD_MODULE_CONSTANTS = {"math": frozenset({"inf", "nan"})}
TENSOR_METHODS = frozenset({"size", "stride", "storage_offset", "numel", "dim"})

#: Operators a graph node may call: aten/prims overloads, this package's own operators
#: (:data:`escn_train.models.fast.operators.OPERATORS`, named here so that this check imports
#: no model code), and a few Python ones.
OPERATOR_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.(?!__)[A-Za-z0-9_]+\.[A-Za-z][A-Za-z0-9_]*")
PYTHON_TARGETS = frozenset(
    ["torch.ops.escn_train." + n + ".default" for n in (
        "grid_silu", "grid_silu_backward", "first_layer", "first_layer_backward", "so2_stage", "so2_stage_backward")] +
    ["_operator." + n for n in "getitem add sub mul floordiv truediv mod neg pow eq ne lt le gt ge and_ or_ not_".split()]
    + ["torch." + n for n in "sym_float sym_int sym_max sym_min sym_not sym_ite sym_sqrt _sym_sqrt".split()]
    + ["math." + n for n in "ceil floor trunc sqrt".split()]
)

BINARY_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
GUARD_BINARY_OPERATORS = BINARY_OPERATORS + (ast.LShift, ast.RShift, ast.BitAnd, ast.BitOr)
COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


# ---------------------------------------------------------------------------------------- expressions
def _parse(text: Any, what: str) -> ast.expr:
    if not isinstance(text, str):
        raise _Refused(f"{what} is a {type(text).__name__}, not a string")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise _Refused(f"{what} is {len(text)} characters long (at most {MAX_EXPRESSION_CHARS})")
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _Refused(f"{what} {text[:80]!r} is not an expression ({type(exc).__name__})") from None


class _Refused(Exception):
    """Internal: why one string was refused (the caller adds the file and the place)."""


def _check_int(value: int, text: str) -> None:
    if len(str(abs(value))) > MAX_INT_DIGITS:
        raise _Refused(f"integer with more than {MAX_INT_DIGITS} digits in {text[:80]!r}")


def _literal_int(node: ast.expr) -> int | None:
    """The integer a node spells (``3``, ``-3``, ``Integer(3)``), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal_int(node.operand)
        return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" and node.args:
        return _literal_int(node.args[0])
    return None


def _has_symbol(node: ast.expr) -> bool:
    return any(
        (isinstance(n, ast.Name) and SYMBOL_NAME.fullmatch(n.id))
        or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Symbol")
        or (isinstance(n, ast.Subscript) and _is_source(n))
        for n in ast.walk(node)
    )


def _check_exponent(node: ast.expr, text: str) -> None:
    """Numbers would be raised at parse time: only small literal integer exponents, floats,
    rationals, or exponents that hold a symbol (which stay unevaluated)."""
    value = _literal_int(node)
    if value is not None:
        if abs(value) > MAX_LITERAL_EXPONENT:
            raise _Refused(f"power with exponent {value} in {text[:80]!r} (at most {MAX_LITERAL_EXPONENT})")
        return
    if isinstance(node, ast.Constant) and type(node.value) is float:
        return
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Float", "Rational"):
        return
    if not _has_symbol(node):
        raise _Refused(f"power with a computed exponent in {text[:80]!r}")


def _visit_shared(node: ast.AST, visit: Any, text: str, where: str, binary_operators: tuple) -> bool:
    """The node kinds both checkers accept alike: bounded constants, arithmetic with
    ``binary_operators``, signs, ``not``, comparisons and boolean operators (children through
    ``visit``). False when ``node`` is none of them; ``where`` prefixes the quoted text."""
    if isinstance(node, ast.Constant):
        if type(node.value) is int:
            _check_int(node.value, text)
        elif type(node.value) not in (bool, float):
            raise _Refused(f"constant {node.value!r} in {where}{text[:80]!r}")
    elif isinstance(node, ast.BinOp) and isinstance(node.op, binary_operators):
        if isinstance(node.op, ast.Pow):
            _check_exponent(node.right, text)
        visit(node.left)
        visit(node.right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        visit(node.operand)
    elif isinstance(node, ast.Compare) and all(isinstance(op, COMPARISONS) for op in node.ops):
        for child in (node.left, *node.comparators):
            visit(child)
    elif isinstance(node, ast.BoolOp):
        for child in node.values:
            visit(child)
    else:
        return False
    return True


def check_sympy_expression(text: Any) -> None:
    """Raise ``_Refused`` unless ``text`` is a shape expression as torch writes it: symbols,
    numbers, arithmetic, comparisons and the sympy/torch functions of :data:`SYMPY_FUNCTIONS`."""
    tree = _parse(text, "symbolic expression")

    def visit(node: ast.AST) -> None:
        if _visit_shared(node, visit, text, "", BINARY_OPERATORS):
            return
        if isinstance(node, ast.Name):
            if not (node.id in SYMPY_CONSTANTS or SYMBOL_NAME.fullmatch(node.id)):
                raise _Refused(f"name {node.id!r} in {text[:80]!r}")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_FUNCTIONS:
                raise _Refused(f"call of {ast.unparse(node.func)[:40]!r} in {text[:80]!r}")
            name = node.func.id
            args = list(node.args)
            if name in ("Symbol", "Float", "Integer") and args and isinstance(args[0], ast.Constant) \
                    and isinstance(args[0].value, str):
                if not STRING_ARGUMENTS[name].fullmatch(args[0].value):
                    raise _Refused(f"{name} of {args[0].value[:40]!r} in {text[:80]!r}")
                args = args[1:]
            if name in POWERS and len(node.args) == 2:
                _check_exponent(node.args[1], text)
            for keyword in node.keywords:
                if keyword.arg not in SYMPY_KEYWORDS:
                    raise _Refused(f"keyword {keyword.arg!r} in {text[:80]!r}")
                if not (isinstance(keyword.value, ast.Constant) and type(keyword.value.value) in (bool, int)):
                    raise _Refused(f"keyword {keyword.arg!r} with a non-constant value in {text[:80]!r}")
            for arg in args:
                visit(arg)
        elif isinstance(node, ast.Tuple):
            for child in node.elts:
                visit(child)
        else:
            raise _Refused(f"{type(node).__name__} in {text[:80]!r}")

    visit(tree)


def _is_source(node: ast.expr) -> bool:
    """``L['name']`` followed by ``['key']`` / ``[index]`` subscripts (a traced input)."""
    if not isinstance(node, ast.Subscript):
        return False
    key = node.slice
    if not (isinstance(key, ast.Constant) and type(key.value) in (str, int)):
        return False
    if isinstance(key.value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,100}", key.value):
        return False
    if isinstance(node.value, ast.Name):
        return node.value.id == "L" and isinstance(key.value, str)
    return _is_source(node.value)


def check_guard(text: Any) -> None:
    """Raise ``_Refused`` unless ``text`` is a shape guard as torch prints it, e.g.
    ``L['edge_index'].size()[1] == L['edge_distance'].size()[0]``."""
    tree = _parse(text, "guard")

    def visit(node: ast.AST) -> None:
        if _visit_shared(node, visit, text, "guard ", GUARD_BINARY_OPERATORS):
            return
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.attr in GUARD_MODULE_CONSTANTS.get(node.value.id, ()):
            return
        elif isinstance(node, ast.Subscript):
            # (source).size()[i]; sources themselves are only valid as method receivers
            if not (isinstance(node.slice, ast.Constant) and type(node.slice.value) is int):
                raise _Refused(f"subscript in guard {text[:80]!r}")
            visit(node.value)
        elif isinstance(node, ast.Call):
            func = node.func
            if node.keywords:
                raise _Refused(f"keyword argument in guard {text[:80]!r}")
            if isinstance(func, ast.Name) and func.id in GUARD_FUNCTIONS:
                pass
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.attr in GUARD_MODULE_FUNCTIONS.get(func.value.id, ()):
                pass
            elif isinstance(func, ast.Attribute) and func.attr in TENSOR_METHODS and _is_source(func.value):
                if node.args:
                    raise _Refused(f"arguments to .{func.attr}() in guard {text[:80]!r}")
                return
            else:
                raise _Refused(f"call of {ast.unparse(func)[:40]!r} in guard {text[:80]!r}")
            for arg in node.args:
                visit(arg)
        else:
            raise _Refused(f"{type(node).__name__} in guard {text[:80]!r}")

    visit(tree)


PLAIN_STRING = re.compile(r"[^'\"\\\n\r]{0,1000}")


def check_string_argument(value: Any) -> None:
    if not isinstance(value, str) or not PLAIN_STRING.fullmatch(value):
        raise _Refused(f"string argument {str(value)[:80]!r} (quotes, backslashes and newlines are not expected)")


def check_operator_target(target: Any) -> None:
    if not isinstance(target, str) or not (OPERATOR_TARGET.fullmatch(target) or target in PYTHON_TARGETS):
        raise _Refused(f"graph node calls {str(target)[:80]!r} (only aten/prims and escn_train operators are expected)")


# ---------------------------------------------------------------------------------------- the archive
def _walk(value: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    """``(kind, place, value)`` for every string of the program JSON that torch parses."""
    if isinstance(value, dict):
        for key, child in value.items():
            place = f"{where}.{key}"
            if key == "expr_str":
                yield "expr", place, child
            elif key == "guards_code" and isinstance(child, list):
                for i, guard in enumerate(child):
                    yield "guard", f"{place}[{i}]", guard
                continue
            elif key == "target":  # graph nodes: the operator each one calls
                yield "target", place, child
            elif key == "as_string":  # string arguments; torch pastes some into generated guard code
                yield "string", place, child
            elif key == "range_constraints" and isinstance(child, dict):
                for name in child:
                    if not SYMBOL_NAME.fullmatch(str(name)):
                        yield "expr", f"{place} key", name
            yield from _walk(child, place)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _walk(child, f"{where}[{i}]")


def _program_files(names: list[str], path: str) -> tuple[str, list[str]]:
    prefixes = {n.split("/", 1)[0] for n in names}
    if len(prefixes) != 1 or any("/" not in n for n in names):
        raise UnsafeModelError(f"{path}: not a torch.export archive (entries outside one top-level folder)")
    prefix = prefixes.pop() + "/"
    lowered = [n.lower() for n in names]
    if len(set(lowered)) != len(lowered):
        raise UnsafeModelError(f"{path}: the archive lists an entry twice; refusing it (torch and Python may read different copies)")
    allowed = re.compile(
        r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
        r"|models/[A-Za-z0-9_]+\.json|data/weights/(weight_[0-9]+|[A-Za-z0-9_]+_weights_config\.json)"
        r"|data/constants/(tensor_[0-9]+|[A-Za-z0-9_]+_constants_config\.json)"
        r"|data/sample_inputs/[A-Za-z0-9_]+\.pt|extra/[^/]+)"
    )
    for name in names:
        rest = name[len(prefix):]
        if rest and not name.endswith("/") and not allowed.fullmatch(rest):
            raise UnsafeModelError(
                f"{path}: archive entry {name!r} is not part of a torch.export program as escn-export writes it "
                "(AOTInductor libraries, pickled objects and legacy payloads are refused)"
            )
    return prefix, [n for n in names if n[len(prefix):].startswith("models/") and n.endswith(".json")]


def _check_payload_config(config: Any, path: str, name: str) -> None:
    entries = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeModelError(f"{path}: {name} is not a payload table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
            raise UnsafeModelError(
                f"{path}: {name} entry {fqn!r} is a pickled object ({str(meta)[:80]}); escn-export writes plain tensors only"
            )


def check_exported_archive(data: bytes, path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeModelError` (naming ``path`` and the place) unless the ``.pt2``
    archive ``data`` holds only what escn-export writes; nothing in it is evaluated."""
    path = str(path)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise UnsafeModelError(f"{path}: not a zip archive ({exc})") from None
    prefix, programs = _program_files(names, path)
    if not programs:
        raise UnsafeModelError(f"{path}: torch.export archive without a program (no models/*.json)")
    checks = {"expr": check_sympy_expression, "guard": check_guard, "target": check_operator_target,
              "string": check_string_argument}
    for name in programs:
        try:
            program = json.loads(archive.read(name))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnsafeModelError(f"{path}: {name} is not JSON ({exc})") from None
        for kind, place, value in _walk(program, name.rsplit("/", 1)[-1]):
            try:
                checks[kind](value)
            except _Refused as why:
                raise UnsafeModelError(f"{path}: refused {place}: {why}; this file was not written by escn-export and "
                                       "could run code when loaded") from None
    for name in names:
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            try:
                config = json.loads(archive.read(name))
            except (ValueError, UnicodeDecodeError) as exc:
                raise UnsafeModelError(f"{path}: {name} is not JSON ({exc})") from None
            _check_payload_config(config, path, name)
            for kind, place, value in _walk(config, name.rsplit("/", 1)[-1]):
                try:
                    checks[kind](value)
                except _Refused as why:
                    raise UnsafeModelError(f"{path}: refused {place}: {why}") from None
    for name in names:
        if "/data/sample_inputs/" in name:
            _check_plain_pickle(archive.read(name), path, name)


def _check_plain_pickle(raw: bytes, path: str, name: str) -> None:
    """torch reads sample inputs with ``weights_only=True`` and, when that fails, with
    ``weights_only=False``: refuse anything the safe reader does not accept."""
    import torch

    try:
        inputs = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means torch would fall back to full pickle
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UnsafeModelError(f"{path}: {name} needs full pickle to load ({first}); refusing it") from None
    # (args, kwargs): their structure becomes the input paths pasted into the guard code
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], tuple)
            and all(isinstance(t, torch.Tensor) for t in inputs[0]) and inputs[1] == {}):
        raise UnsafeModelError(
            f"{path}: {name} is not a tuple of tensors without keyword arguments, as escn-export writes; refusing it"
        )
