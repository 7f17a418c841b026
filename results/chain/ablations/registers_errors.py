"""Where a trained registers model goes wrong: every prefix of a program is run as its own problem (the
model's registers after each instruction), and the first instruction after which they are wrong is counted
by its kind (op and source: a digit, another register, the same register), by its position, and by the
depth of the value it writes (sums and differences applied since its inputs were written as digits).
  python registers_errors.py <workdir> <k> <programs> [<pad>]     (README: k = 12, 400 programs)
<pad> no-op instructions (``A+0;``, ``B-0;``, ...) go before each program, uncounted: if errors start at the
same real instruction with and without them, it is the number of operations done that matters, not where in
the text an instruction sits."""
import collections
import sys

import numpy as np

from tfmstep import saving
from tfmstep.data import chains


def kind(instruction: str) -> str:
    """'A+B' -> '+reg', 'A-4' -> '-digit', 'A+A' -> '+self'."""
    target, op, source = instruction[0], instruction[1], instruction[2]
    if not source.isalpha():
        return op + "digit"
    return op + ("self" if source == target else "reg")


def value_depths(instructions: list[str]) -> list[int]:
    """The depth of the value each instruction writes: a digit (or a start value) is 0, a copy keeps its
    source's depth, a sum or difference is one more than the deeper of its operands."""
    depth = dict.fromkeys(chains.REGISTERS, 0)
    written = []
    for target, op, source in instructions:
        source_depth = depth.get(source, 0)  # a digit: 0
        depth[target] = source_depth if op == "=" else max(depth[target], source_depth) + 1
        written.append(depth[target])
    return written


def main(workdir: str, k: int, programs: int, pad: int = 0) -> None:
    model, _, _ = saving.load_trained(workdir)
    rng = np.random.default_rng(7)
    wrong_by_kind, seen_by_kind = collections.Counter(), collections.Counter()
    wrong_at, seen_at = collections.Counter(), collections.Counter()
    wrong_by_depth, seen_by_depth = collections.Counter(), collections.Counter()
    for _ in range(programs):
        text, answer = chains.generate_problem("registers", k, rng)
        start, body = text.split(":")
        instructions = [part for part in body.rstrip("=").split(";") if part]
        no_ops = "".join(f"{chains.REGISTERS[rng.integers(3)]}{'+-'[rng.integers(2)]}0;" for _ in range(pad))
        prefixes = [start + ":" + no_ops + "".join(part + ";" for part in instructions[:j]) + "="
                    for j in range(1, k + 1)]
        truth = [chains.solve("registers", prefix)[0] for prefix in prefixes]  # the registers after each
        assert truth[-1] == answer, (text, answer, truth)
        predicted, _ = model.answer(prefixes)
        depths = value_depths(instructions)
        for position, instruction in enumerate(instructions, 1):
            seen_by_kind[kind(instruction)] += 1
            seen_at[position] += 1
            seen_by_depth[depths[position - 1]] += 1
        wrong = [j for j in range(k) if predicted[j] != truth[j]]
        if wrong:
            wrong_by_kind[kind(instructions[wrong[0]])] += 1
            wrong_at[wrong[0] + 1] += 1
            wrong_by_depth[depths[wrong[0]]] += 1
    print("first wrong instruction, per instruction of each kind:")
    for name in sorted(seen_by_kind):
        print(f"  {name:8s} {wrong_by_kind[name]:4d} / {seen_by_kind[name]:5d} = "
              f"{wrong_by_kind[name] / seen_by_kind[name]:.4f}")
    print("per position:", {p: round(wrong_at[p] / seen_at[p], 4) for p in sorted(seen_at)})
    print("per depth of the value written:",
          {d: f"{wrong_by_depth[d]}/{seen_by_depth[d]}" for d in sorted(seen_by_depth)})


if __name__ == "__main__":
    main(sys.argv[1], *(int(arg) for arg in sys.argv[2:]))
