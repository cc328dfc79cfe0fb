"""Run nodes and samplers the way ComfyUI's executor runs them.

ComfyUI (execution.py) validates a prompt before running it (required inputs
present, numbers inside their min/max, values of a list-typed combo among the
choices, the node's own VALIDATE_INPUTS, or for a V3 node its schema's inputs
and its ``validate_inputs`` override), then executes every node inside
``torch.inference_mode()`` through ``execution.get_output_data``: a V1 node's
FUNCTION on an instance, a V3 node's ``EXECUTE_NORMALIZED`` on a locked clone
of the class (``PREPARE_CLASS_CLONE``). Tests that exercise nodes or sampling
go through ``run_node`` / ``in_prompt`` so that what the suite proves holds in
a real prompt: a tensor made by one node is an inference tensor when the next
one sees it.
"""
import asyncio
import contextlib
import inspect

import torch

PROMPT_ID = "dreamcache-test"


def in_prompt():
    """The context ComfyUI executes a prompt in (use it around sampling calls that stand for a node)."""
    return torch.inference_mode()


def is_v3(node_class) -> bool:
    from comfy_api.internal import _ComfyNodeInternal
    return issubclass(node_class, _ComfyNodeInternal)


def declared_inputs(node_class) -> dict:
    """{"required": {...}, "optional": {...}} as ComfyUI reads it from the node class: a V3 node's
    INPUT_TYPES is its schema's V1 view (hidden inputs left out, as get_input_data reads it)."""
    declared = node_class.INPUT_TYPES(include_hidden=False) if is_v3(node_class) else node_class.INPUT_TYPES()
    return {"required": dict(declared.get("required", {})), "optional": dict(declared.get("optional", {}))}


def bind_inputs(node_class, args, kwargs) -> dict:
    """Positional arguments in declared order (required, then optional), keywords by name."""
    declared = declared_inputs(node_class)
    names = list(declared["required"]) + list(declared["optional"])
    if len(args) > len(names):
        raise TypeError(f"{node_class.__name__} takes {len(names)} inputs, {len(args)} were given")
    inputs = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in inputs:
            raise TypeError(f"{node_class.__name__}: input {name!r} given twice")
        inputs[name] = value
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise TypeError(f"{node_class.__name__} has no inputs {unknown} (it declares {names})")
    return inputs


def type_name(spec) -> object:
    kind = spec[0]
    return kind if isinstance(kind, list) else str.__str__(kind) if isinstance(kind, str) else kind


def check_widget_value(node_class, name, spec, value, own_check=False):
    """ComfyUI's validate_inputs for one widget value (execution.py): type, min/max, the choices of a list-typed
    combo (execution.py checks no others: a V3 Combo, typed "COMBO", is checked by the node when it runs).
    ``own_check``: the node's validate function names this input, so ComfyUI leaves min/max and the choices
    to it (the type conversion still happens)."""
    kind = type_name(spec)
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    where = f"{node_class.__name__}.{name}"
    if isinstance(kind, list):
        if value not in kind and not own_check:
            raise ValueError(f"ComfyUI refuses the prompt: {where} = {value!r} is not among the choices {kind}")
    elif kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"ComfyUI refuses the prompt: {where} = {value!r} is not a number")
        value = int(value) if kind == "INT" else float(value)
        if own_check:
            return value
        if "min" in options and value < options["min"]:
            raise ValueError(f"ComfyUI refuses the prompt: {where} = {value} is below its minimum {options['min']}")
        if "max" in options and value > options["max"]:
            raise ValueError(f"ComfyUI refuses the prompt: {where} = {value} is above its maximum {options['max']}")
    elif kind == "STRING" and not isinstance(value, str):
        raise ValueError(f"ComfyUI refuses the prompt: {where} = {value!r} is not a string")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        raise ValueError(f"ComfyUI refuses the prompt: {where} = {value!r} is not a boolean")
    return value


def validate_function_name(node_class) -> str:
    return "validate_inputs" if is_v3(node_class) else "VALIDATE_INPUTS"


def validation_function(node_class):
    """The queue-time check ComfyUI calls, or None: a V3 node's own ``validate_inputs`` (ComfyNode's placeholder
    does not count), a V1 node's VALIDATE_INPUTS."""
    if is_v3(node_class):
        from comfy_api.internal import first_real_override
        return first_real_override(node_class, "validate_inputs")
    return getattr(node_class, "VALIDATE_INPUTS", None)


def validate(node_class, inputs: dict) -> dict:
    """What ComfyUI checks at queue time; returns the inputs as the executor passes them."""
    import execution

    declared = declared_inputs(node_class)
    missing = [name for name in declared["required"] if name not in inputs]
    if missing:
        raise ValueError(f"ComfyUI refuses the prompt: {node_class.__name__} misses required inputs {missing}")
    function_name = validate_function_name(node_class)
    validate_function = validation_function(node_class)
    accepted = set() if validate_function is None else set(inspect.getfullargspec(validate_function).args)
    checked = {}
    for name, value in inputs.items():
        spec = declared["required"].get(name) or declared["optional"].get(name)
        kind = type_name(spec)
        is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
        checked[name] = check_widget_value(node_class, name, spec, value, name in accepted) if is_widget else value
    if validate_function is not None:
        wanted = {k: [v] for k, v in checked.items() if k in accepted}
        results = asyncio.run(execution._async_map_node_over_list(
            PROMPT_ID, "1", node_class, wanted, function_name))
        for result in results:
            if result is not True:
                raise ValueError(f"ComfyUI refuses the prompt: {node_class.__name__}.{function_name} says {result!r}")
    return checked


def run_node(node_class, *args, **kwargs):
    """Validate the inputs, then execute the node with ComfyUI's own executor code inside inference mode.

    Returns the node's outputs as a tuple; an output node with no outputs returns {"ui": what it shows}.
    """
    import execution

    inputs = validate(node_class, bind_inputs(node_class, args, kwargs))
    node = node_class if is_v3(node_class) else node_class()
    with in_prompt():
        output, ui, _, pending = asyncio.run(execution.get_output_data(
            PROMPT_ID, "1", node, {name: [value] for name, value in inputs.items()}))
    assert not pending, f"{node_class.__name__} left an asynchronous task running"
    if not output and ui:
        return {"ui": ui}
    return tuple(values[0] for values in output)


@contextlib.contextmanager
def recorded_progress():
    """The (value, total) pairs nodes report through comfy.utils.ProgressBar, as the server's hook receives them."""
    import comfy.utils

    reports = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: reports.append((value, total)))
    try:
        yield reports
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
