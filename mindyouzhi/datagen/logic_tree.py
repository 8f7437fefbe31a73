"""Logic trees for word problems: quantities are nodes, formulas are (hyper-)edges.

A tree is grown from a target quantity downwards: a node is either *given* (a leaf with a sampled
value that the question states) or *derived* by one formula from its children.  Depth counts from
the target (depth 0); the edge from a formula to one of its inputs has the depth of that input.

Cutting the edge to an input at depth d removes that input and everything below it from the
givens, so nothing in the question lets anyone compute it: the target becomes unanswerable, and
the refusal can name exactly what is missing.  :func:`solve` is the forward-chaining solver the
tests use to check both claims on the emitted JSON.
"""
from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence


# --------------------------------------------------------------------------------------------
# Safe arithmetic
# --------------------------------------------------------------------------------------------
def iit_annual(taxable: float) -> float:
    """China's comprehensive-income individual income tax (annual table, 2019 reform)."""
    brackets = ((36_000, 0.03, 0), (144_000, 0.10, 2_520), (300_000, 0.20, 16_920), (420_000, 0.25, 31_920),
                (660_000, 0.30, 52_920), (960_000, 0.35, 85_920), (math.inf, 0.45, 181_920))
    if taxable <= 0:
        return 0.0
    for upper, rate, quick_deduction in brackets:
        if taxable <= upper:
            return taxable * rate - quick_deduction
    raise AssertionError("unreachable: the last bracket is unbounded")


FUNCTIONS: dict[str, Callable] = {"min": min, "max": max, "iit_annual": iit_annual}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}


def variables(expression: str) -> set[str]:
    tree = ast.parse(expression, mode="eval")
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id not in FUNCTIONS}


def evaluate(expression: str, values: dict[str, float]) -> float:
    """Arithmetic, min/max and the tax table over named values; nothing else is allowed."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            return FUNCTIONS[node.func.id](*(walk(arg) for arg in node.args))
        raise ValueError(f"unsupported syntax in formula: {ast.dump(node)[:60]}")

    return float(walk(ast.parse(expression, mode="eval")))


# --------------------------------------------------------------------------------------------
# Library types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantity:
    key: str
    zh: str
    en: str
    unit: str
    sampler: tuple  # ("range", low, high, step) or ("choice", v1, v2, …)
    fact_zh: str = "{name}为{value}"
    fact_en: str = "the {name} is {value}"

    def sample(self, rng: random.Random) -> float:
        kind, *spec = self.sampler
        if kind == "choice":
            return spec[rng.randrange(len(spec))]
        low, high, step = spec
        steps = int(round((high - low) / step))
        return round(low + step * rng.randint(0, steps), 10)


@dataclass(frozen=True)
class Formula:
    key: str
    output: str
    expression: str
    zh: str  # how the step reads in a worked solution, e.g. "月利率 = 年利率 ÷ 12"
    en: str

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(sorted(variables(self.expression)))


@dataclass
class Node:
    quantity: str
    depth: int
    formula: Optional[str] = None  # None for a given leaf
    children: list = field(default_factory=list)
    value: float = 0.0


@dataclass
class Tree:
    root: Node
    nodes: dict[str, Node]

    @property
    def depth(self) -> int:
        return max(node.depth for node in self.nodes.values())

    def givens(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.formula is None]

    def cuttable_edges(self, depth: int) -> list[tuple[Node, Node]]:
        """(parent, child) pairs whose child sits at ``depth``."""
        return [(parent, child) for parent in self.nodes.values() for child in parent.children if child.depth == depth]


class Library:
    def __init__(self, quantities: Sequence[Quantity], formulas: Sequence[Formula]):
        self.quantities = {q.key: q for q in quantities}
        self.formulas = {f.key: f for f in formulas}
        self.rules: dict[str, list[Formula]] = {}
        for formula in formulas:
            missing = [name for name in (formula.output, *formula.inputs) if name not in self.quantities]
            if missing:
                raise ValueError(f"formula {formula.key} names unknown quantities {missing}")
            self.rules.setdefault(formula.output, []).append(formula)
        self._depth_cache: dict = {}

    def max_depth(self, target: str, used: frozenset = frozenset()) -> int:
        """Deepest tree reachable from ``target`` without using a quantity in ``used`` twice."""
        key = (target, used)
        if key not in self._depth_cache:
            taken = used | {target}
            best = 0
            for formula in self.rules.get(target, []):
                inputs = set(formula.inputs)
                if inputs & taken:
                    continue
                best = max(best, 1 + max(self.max_depth(name, frozenset(taken | inputs)) for name in inputs))
            self._depth_cache[key] = best
        return self._depth_cache[key]

    def grow(self, target: str, rng: random.Random, max_depth: int, min_depth: int = 0,
             expand_probability: float = 0.7) -> Tree:
        """Grow a tree in which no quantity appears twice; one path is forced down to ``min_depth``.

        A repeated quantity would be stated twice in the question and would let a cut be bypassed,
        so formulas whose inputs are already in the tree (or claimed by a sibling) are not used.
        """
        max_depth = max(max_depth, min_depth)
        used = {target}
        nodes: dict[str, Node] = {}

        def reaches(formula: Formula, remaining: int) -> bool:
            taken = frozenset(used | set(formula.inputs))
            return any(1 + self.max_depth(name, taken) >= remaining for name in formula.inputs)

        def expand(key: str, depth: int, must_reach: int) -> Node:
            node = Node(key, depth)
            nodes[key] = node
            options = [f for f in self.rules.get(key, []) if not set(f.inputs) & used]
            if must_reach > depth:
                options = [f for f in options if reaches(f, must_reach - depth)]
            wants_expand = must_reach > depth or (depth < max_depth and rng.random() < expand_probability)
            if not options or not wants_expand:
                return node
            formula = options[rng.randrange(len(options))]
            node.formula = formula.key
            used.update(formula.inputs)
            forced = None
            if must_reach > depth + 1:
                taken = frozenset(used)
                deep = [name for name in formula.inputs if self.max_depth(name, taken) >= must_reach - depth - 1]
                forced = deep[rng.randrange(len(deep))]
            # The forced child goes first so its siblings cannot take the quantities its path needs.
            order = sorted(formula.inputs, key=lambda name: name != forced)
            children = {name: expand(name, depth + 1, must_reach if name == forced else 0) for name in order}
            node.children = [children[name] for name in formula.inputs]
            return node

        root = expand(target, 0, min_depth)
        tree = Tree(root, nodes)
        self._compute(tree, rng)
        return tree

    def _compute(self, tree: Tree, rng: random.Random) -> None:
        def value_of(node: Node) -> float:
            if node.formula is None:
                node.value = self.quantities[node.quantity].sample(rng)
            else:
                inputs = {child.quantity: value_of(child) for child in node.children}
                node.value = evaluate(self.formulas[node.formula].expression, inputs)
            return node.value

        value_of(tree.root)


# --------------------------------------------------------------------------------------------
# Cutting and solving
# --------------------------------------------------------------------------------------------
def subtree(node: Node) -> list[Node]:
    out = [node]
    for child in node.children:
        out.extend(subtree(child))
    return out


def tree_json(tree: Tree, library: Library, cut: Optional[tuple[Node, Node]] = None) -> dict:
    """The emitted form: nodes (given ones carry their value) and formulas (with their inputs).

    With ``cut`` the child and its subtree disappear and the parent formula lists the input it lost.
    """
    removed = {node.quantity for node in subtree(cut[1])} if cut else set()
    nodes, formulas = [], []
    for node in subtree(tree.root):
        if node.quantity in removed:
            continue
        given = node.formula is None
        nodes.append({"id": node.quantity, "depth": node.depth, "given": given,
                      "value": node.value if given else None, "unit": library.quantities[node.quantity].unit})
        if not given:
            formula = library.formulas[node.formula]
            entry = {"id": formula.key, "output": node.quantity, "expression": formula.expression,
                     "inputs": [c.quantity for c in node.children if c.quantity not in removed], "depth": node.depth + 1}
            if cut and cut[0] is node:
                entry["cut_input"] = cut[1].quantity
            formulas.append(entry)
    return {"target": tree.root.quantity, "nodes": nodes, "formulas": formulas}


def solve(tree: dict) -> dict[str, float]:
    """Forward chaining over an emitted tree: every value derivable from the givens."""
    known = {node["id"]: node["value"] for node in tree["nodes"] if node["given"]}
    pending = list(tree["formulas"])
    progress = True
    while progress:
        progress = False
        for formula in list(pending):
            if formula["output"] in known:
                pending.remove(formula)
                continue
            if variables(formula["expression"]) <= set(known):
                known[formula["output"]] = evaluate(formula["expression"], known)
                pending.remove(formula)
                progress = True
    return known
