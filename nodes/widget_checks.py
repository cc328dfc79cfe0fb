"""Checks of the DreamCache nodes' numbers and texts, at queue time and when the node runs.

ComfyUI calls a node's ``validate_inputs`` classmethod when the prompt is queued, with the inputs it names that
are widget values (a linked input is not passed: its value does not exist yet, and ComfyUI checks no min/max
of it at all). For every input a ``validate_inputs`` names, ComfyUI skips its own min/max check, so
``widget_problems`` does it here, together with the finiteness check ComfyUI never does (NaN passes
``min <= value <= max``). A node's ``execute`` calls ``check_number_inputs`` with the same numbers: one check,
against the node's declared ranges, whether a number came from a widget or through a link.
"""
from ..dreamcache_core.method.input_checks import number_problem


def widget_problems(node_class, values: dict) -> list:
    """Problems of the given FLOAT/INT widget ``values`` (None = not given): finite and inside the declared range
    (read from the node's schema through its V1 view)."""
    declared = node_class.INPUT_TYPES()
    specs = dict(declared.get("required", {}), **declared.get("optional", {}))
    problems = []
    for name, value in values.items():
        if value is None:
            continue
        options = specs[name][1] if len(specs[name]) > 1 else {}
        problem = number_problem(value, name, options.get("min"), options.get("max"),
                                 f"Its default is {options['default']}." if "default" in options else "")
        if problem:
            problems.append(problem)
    return problems


def check_number_inputs(node_class, values: dict) -> None:
    """ValueError with every problem ``widget_problems`` finds in ``values`` (one per line): what a node's
    ``execute`` calls, so a linked number (which ``validate_inputs`` never sees) meets the same check."""
    problems = widget_problems(node_class, values)
    if problems:
        raise ValueError("\n".join(problems))


def text_problem(check, text, name: str):
    """The message of ``check(text)`` raising ValueError, prefixed with the input's name; None when it passes or
    the input is not given."""
    if text is None:
        return None
    try:
        check(text)
    except ValueError as error:
        return f"{name}: {error}"
    return None


def choice_problem(value, choices, name: str):
    """The message for a menu value that is not one of ``choices`` (ComfyUI 0.3.64 does not check a V3 node's
    menu values when the prompt is queued); None when it is one, or not given."""
    if value is None or value in choices:
        return None
    return f"{name}: {value!r} is not one of the choices {list(choices)}. Pick one from the menu."


def validation_result(problems) -> object:
    """What validate_inputs returns: True, or every problem found, one per line."""
    found = [p for p in problems if p]
    return True if not found else "\n".join(found)
