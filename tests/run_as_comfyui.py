"""Run nodes the way ComfyUI runs them: as a prompt, through ComfyUI's own executor.

``run_node(NodeClass, ...)`` builds a real API-format prompt around the node and hands it to ComfyUI:

- every input the test gives that a user could type into a widget (a plain number, string or bool for an INT,
  FLOAT, STRING, BOOLEAN or COMBO input) is written into the prompt as a widget value; every other input (a
  MODEL, a tensor, a dict, None, or anything wrapped in ``linked(...)``) arrives through a link from a small
  test-only "value source" node that outputs the Python object the test holds;
- the node's outputs are linked into a test-only "capture" output node that records what it receives;
- the three node classes are registered in ``nodes.NODE_CLASS_MAPPINGS`` for the duration of the call, the
  prompt is checked by ``execution.validate_prompt`` (ComfyUI's queue-time validation: required inputs, link
  types, min/max, combo choices, the node's ``validate_inputs`` / ``VALIDATE_INPUTS``) and run by
  ``execution.PromptExecutor`` (which executes every node inside ``torch.inference_mode()`` itself).

Nothing here calls ComfyUI's private helpers or imitates its validation: a refused prompt raises ValueError
("ComfyUI refuses the prompt: ...") carrying ComfyUI's error entries and the node's own message text; an
exception raised while a node runs is re-raised as it was raised. The pieces used exist with the same meaning
from ComfyUI 0.3.64 to 0.8.0; where they differ (PromptExecutor's cache arguments) the code asks the
signature, not the version.
"""
import asyncio
import contextlib
import inspect
import itertools

import torch

PROMPT_ID = "dreamcache-test"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NODE_ID = "node"
CAPTURE_ID = "capture"


def in_prompt():
    """The context ComfyUI executes a prompt in (use it around sampling calls that stand for a node)."""
    return torch.inference_mode()


class linked:
    """Wrap a run_node input to make it arrive through a link (as from another node) rather than as a widget
    value typed into the prompt: ComfyUI checks widget values at queue time, linked ones only when the node runs."""

    def __init__(self, value):
        self.value = value


class AnyType(str):
    """ComfyUI's long-standing "any type" for custom nodes: a str that equals every type name in link checks."""

    def __ne__(self, other):
        return False


ANY = AnyType("*")


def is_v3(node_class) -> bool:
    return hasattr(node_class, "GET_SCHEMA")


def declared_inputs(node_class) -> list:
    """[(name, type, optional)] in declared order: a V3 node's schema inputs (hidden inputs are not inputs),
    a V1 node's INPUT_TYPES() required then optional."""
    if is_v3(node_class):
        return [(put.id, put.get_io_type(), bool(put.optional)) for put in node_class.GET_SCHEMA().inputs]
    declared = node_class.INPUT_TYPES()
    return [(name, spec[0], optional)
            for optional, group in ((False, declared.get("required", {})), (True, declared.get("optional", {})))
            for name, spec in group.items()]


def output_count(node_class) -> int:
    if is_v3(node_class):
        return len(node_class.GET_SCHEMA().outputs)
    return len(node_class.RETURN_TYPES)


def is_output_node(node_class) -> bool:
    if is_v3(node_class):
        return bool(node_class.GET_SCHEMA().is_output_node)
    return getattr(node_class, "OUTPUT_NODE", False) is True


def bind_inputs(node_class, args, kwargs) -> dict:
    """Positional arguments in declared order (required, then optional), keywords by name."""
    names = [name for name, _, _ in declared_inputs(node_class)]
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


def is_widget(kind) -> bool:
    return isinstance(kind, list) or (isinstance(kind, str) and str.__str__(kind) in WIDGET_TYPES)


def is_widget_value(value) -> bool:
    return type(value) in (bool, int, float, str)


def node_name(node_class) -> str:
    """The class_type the node is registered under: its schema's node_id, the stock name ComfyUI already
    registered it under, or its class name."""
    import nodes

    if is_v3(node_class):
        return node_class.GET_SCHEMA().node_id
    for name, registered in nodes.NODE_CLASS_MAPPINGS.items():
        if registered is node_class:
            return name
    return node_class.__name__


_SERIAL = itertools.count()


def value_source_class(values: dict):
    """A node with one widget (the key) whose only output is the object the test holds under that key."""

    class DreamCacheTestValue:
        RETURN_TYPES = (ANY,)
        FUNCTION = "give"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"key": ("STRING", {})}}

        def give(self, key):
            return (values[key],)

    return DreamCacheTestValue


def capture_class(count: int, received: dict):
    """An output node that records the lists it receives on inputs output_0 .. output_{count-1}."""

    class DreamCacheTestCapture:
        RETURN_TYPES = ()
        FUNCTION = "capture"
        OUTPUT_NODE = True
        INPUT_IS_LIST = True
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):
            return {"optional": {f"output_{index}": (ANY, {}) for index in range(count)}}

        def capture(self, **outputs):
            received.update(outputs)
            return {}

    return DreamCacheTestCapture


@contextlib.contextmanager
def registered(classes: dict):
    """Register {class_type: class} in ComfyUI's node mappings for the duration; restore what was there."""
    import nodes

    missing = object()
    previous = {name: nodes.NODE_CLASS_MAPPINGS.get(name, missing) for name in classes}
    nodes.NODE_CLASS_MAPPINGS.update(classes)
    try:
        yield
    finally:
        for name, before in previous.items():
            if before is missing:
                nodes.NODE_CLASS_MAPPINGS.pop(name, None)
            else:
                nodes.NODE_CLASS_MAPPINGS[name] = before


class QuietServer:
    """The server the executor reports to: it takes the messages and sends them nowhere."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def make_executor(server):
    """ComfyUI's PromptExecutor with its classic cache; catches the exception a failing node raised."""
    import execution

    class RecordingExecutor(execution.PromptExecutor):
        raised = None

        def handle_execution_error(self, prompt_id, prompt, current_outputs, executed, error, ex):
            self.raised = ex
            super().handle_execution_error(prompt_id, prompt, current_outputs, executed, error, ex)

    parameters = inspect.signature(execution.PromptExecutor.__init__).parameters
    if "cache_args" in parameters:  # newer ComfyUI: {"lru": size, "ram": headroom in GB}
        return RecordingExecutor(server, cache_args={"lru": 0, "ram": 0.0})
    return RecordingExecutor(server)


def refusal(result, prompt) -> str:
    """ComfyUI's validation result as one message, with each node's own text."""
    import nodes

    _, error, _, node_errors = result
    lines = []
    for node_id, entry in node_errors.items():
        node_class = nodes.NODE_CLASS_MAPPINGS.get(entry["class_type"])
        name = node_class.__name__ if node_class is not None else entry["class_type"]
        said = []
        for reason in entry["errors"]:
            if reason["type"] == "custom_validation_failed":
                function = "validate_inputs" if is_v3(node_class) else "VALIDATE_INPUTS"
                details = reason["details"]
                prefix = f"{reason['extra_info'].get('input_name')} - "
                text = details[len(prefix):] if details.startswith(prefix) else details
                line = f"{name}.{function} says {text!r}"
            else:
                line = f"{name}: {reason['message']}: {reason['details']}"
            if line not in said:
                said.append(line)
        lines += said
    if not lines and error:
        lines.append(f"{error['message']}: {error['details']}")
    return "ComfyUI refuses the prompt: " + "\n".join(lines)


def run_prompt(prompt: dict, classes: dict, outputs=None):
    """Validate and execute an API-format prompt with the given extra node classes registered.

    Returns the executor's history result ({"outputs": {node id: ui}, ...}); raises ValueError when ComfyUI
    refuses the prompt and re-raises what a node raised when it fails."""
    import execution

    with registered(classes):
        result = asyncio.run(execution.validate_prompt(PROMPT_ID, prompt, outputs))
        if not result[0]:
            raise ValueError(refusal(result, prompt))
        server = QuietServer()
        executor = make_executor(server)
        executor.execute(prompt, PROMPT_ID, {}, list(result[2]))
        if executor.raised is not None:
            raise executor.raised
        if not executor.success:
            raise RuntimeError(f"ComfyUI did not finish the prompt: {server.messages}")
        return executor.history_result


def run_node(node_class, *args, **kwargs):
    """Run one node as ComfyUI runs it in a prompt (queue-time validation, then the executor).

    Returns the node's outputs as a tuple; an output node with no outputs returns {"ui": what it shows}.
    """
    inputs = bind_inputs(node_class, args, kwargs)
    kinds = {name: kind for name, kind, _ in declared_inputs(node_class)}
    serial = next(_SERIAL)
    name = node_name(node_class)
    source_name, capture_name = f"DreamCacheTestValue{serial}", f"DreamCacheTestCapture{serial}"
    values, received = {}, {}
    prompt = {NODE_ID: {"class_type": name, "inputs": {}}}
    for input_name, value in inputs.items():
        if not isinstance(value, linked) and is_widget(kinds[input_name]) and is_widget_value(value):
            prompt[NODE_ID]["inputs"][input_name] = value
            continue
        values[input_name] = value.value if isinstance(value, linked) else value
        prompt[f"value {input_name}"] = {"class_type": source_name, "inputs": {"key": input_name}}
        prompt[NODE_ID]["inputs"][input_name] = [f"value {input_name}", 0]
    count = output_count(node_class)
    classes = {name: node_class, source_name: value_source_class(values)}
    if count:
        classes[capture_name] = capture_class(count, received)
        prompt[CAPTURE_ID] = {"class_type": capture_name,
                              "inputs": {f"output_{index}": [NODE_ID, index] for index in range(count)}}
    elif not is_output_node(node_class):
        raise TypeError(f"{node_class.__name__} has no outputs and is not an output node: nothing would run it")
    history = run_prompt(prompt, classes)
    if not count:
        return {"ui": history["outputs"].get(NODE_ID)}
    return tuple(received[f"output_{index}"][0] for index in range(count))


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
