"""Hostile pickles, assembled opcode by opcode.

Every payload that would run code, if it ever ran, creates the file ``marker`` (touch, open
for writing, torch.save, a module that creates it when imported, ...). A test then only has
to check that no marker exists.
"""

from __future__ import annotations

import pickle
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .opcodes import Asm, finish

# Extension codes a loading process may have registered with copyreg. The corpus registers
# them in every process that loads it, so EXT1/EXT2/EXT4 resolve to these callables.
EXTENSIONS: tuple[tuple[int, str, str], ...] = (
    (0xF1, "os", "system"),
    (0x1F2, "posix", "system"),
    (0x1F2F3, "subprocess", "getoutput"),
)


@dataclass(frozen=True)
class Env:
    """Where a payload may point: its marker, and helper files written next to the corpus."""

    marker: str
    scripts: Path  # runpy scripts, nested torch files, .npy files
    modules: Path  # on sys.path of the loading process
    module_name: str  # a module in ``modules`` that creates ``marker`` when imported
    torchscript: str  # a TorchScript archive whose __setstate__ creates its own marker


def touch(marker: str) -> str:
    return f"touch {shlex.quote(marker)}"


def _system(asm: Asm, marker: str) -> Asm:
    """(cmd,) REDUCE after a callable already on the stack."""
    return asm.tuple(touch(marker)).reduce()


def _wrap_dict(asm_value: bytes, proto: int = 2) -> bytes:
    """``{"weight": <value>}``: the shape of a state dict around the payload."""
    asm = Asm(proto).raw(pickle.EMPTY_DICT).str("weight").raw(asm_value).raw(pickle.SETITEM)
    return finish(asm)


# ---------------------------------------------------------------------- code execution
def p_os_system(env: Env) -> bytes:
    return _wrap_dict(_system(Asm(None).global_("os", "system"), env.marker).bytes())


def p_posix_system(env: Env) -> bytes:
    return _wrap_dict(_system(Asm(None).global_("posix", "system"), env.marker).bytes())


def p_stack_global_memo(env: Env) -> bytes:
    # The names reach STACK_GLOBAL from the memo, never as literals next to it.
    asm = Asm(4).str("os").put(0).str("system").put(1).pop().pop()
    asm.str("padding").pop().get(0).get(1).raw(pickle.STACK_GLOBAL)
    _system(asm, env.marker)
    return finish(asm)


def p_dotted_torch_os(env: Env) -> bytes:
    # Protocol 4 find_class walks dotted names: torch -> os -> system.
    asm = Asm(4).global_("torch", "os.system")
    return finish(_system(asm, env.marker))


def p_dotted_argparse_os(env: Env) -> bytes:
    asm = Asm(4).global_("argparse", "_os.system")
    return finish(_system(asm, env.marker))


def p_dotted_stack_global(env: Env) -> bytes:
    asm = Asm(4).stack_global("torch.serialization", "os.system")
    return finish(_system(asm, env.marker))


def p_dotted_allowlisted_prefix(env: Env) -> bytes:
    # An allowlisted class as the first step of an attribute walk.
    asm = Asm(4).global_("collections", "OrderedDict.__init__.__globals__")
    asm.str("_sys").raw(pickle.TUPLE1).pop()
    asm.global_("torch._utils", "_rebuild_tensor_v2.__globals__")
    return finish(asm)


def p_builtins_getattr(env: Env) -> bytes:
    asm = Asm(2).global_("builtins", "getattr")
    asm.mark().global_("builtins", "__import__").tuple("os").reduce().str("system").raw(
        pickle.TUPLE
    )
    asm.reduce()
    return finish(_system(asm, env.marker))


def p_builtins_eval(env: Env) -> bytes:
    code = f"__import__('os').system({touch(env.marker)!r})"
    return finish(Asm(2).call("builtins", "eval", code))


def p_builtins_exec(env: Env) -> bytes:
    code = f"open({env.marker!r}, 'w').close()"
    return finish(Asm(2).call("builtins", "exec", code))


def p_builtins_import(env: Env) -> bytes:
    return finish(Asm(2).call("builtins", "__import__", env.module_name))


def p_builtins_open(env: Env) -> bytes:
    return finish(Asm(2).call("builtins", "open", env.marker, "w"))


def p_subprocess_popen(env: Env) -> bytes:
    return finish(Asm(2).call("subprocess", "Popen", ["touch", env.marker]))


def p_subprocess_check_call(env: Env) -> bytes:
    return finish(Asm(2).call("subprocess", "check_call", ["touch", env.marker]))


def p_runpy_run_path(env: Env) -> bytes:
    script = env.scripts / f"run_{Path(env.marker).name}.py"
    script.write_text(f"open({env.marker!r}, 'w').close()\n")
    return finish(Asm(2).call("runpy", "run_path", str(script)))


def p_importlib_import_module(env: Env) -> bytes:
    return finish(Asm(2).call("importlib", "import_module", env.module_name))


def p_pickle_loads(env: Env) -> bytes:
    inner = p_os_system(env)
    return finish(Asm(2).call("pickle", "loads", inner))


def _evil_torch_file(env: Env, *, legacy_format: bool) -> bytes:
    from .containers import legacy, torch_zip

    inner = p_os_system(env)
    return legacy(inner) if legacy_format else torch_zip(inner)


def p_torch_load_from_bytes(env: Env) -> bytes:
    nested = _evil_torch_file(env, legacy_format=True)
    return finish(Asm(2).call("torch.storage", "_load_from_bytes", nested))


def p_torch_load(env: Env) -> bytes:
    # functools.partial(torch.load, weights_only=False) through partial's __setstate__.
    evil = env.scripts / f"nested_{Path(env.marker).name}.pt"
    evil.write_bytes(_evil_torch_file(env, legacy_format=False))
    asm = Asm(2).global_("functools", "partial").mark().global_("torch", "load").raw(pickle.TUPLE)
    asm.reduce()
    asm.mark().global_("torch", "load").tuple().value({"weights_only": False}).none()
    asm.raw(pickle.TUPLE).build()
    asm.tuple(str(evil)).reduce()
    return finish(asm)


def p_torch_save(env: Env) -> bytes:
    return finish(Asm(2).call("torch", "save", "written", env.marker))


def p_torch_jit_load(env: Env) -> bytes:
    return finish(Asm(2).call("torch.jit", "load", env.torchscript))


def p_numpy_load(env: Env) -> bytes:
    npy = env.scripts / f"evil_{Path(env.marker).name}.npy"
    npy.write_bytes(_npy_with_pickle(p_os_system(env)))
    return finish(Asm(2).call("numpy", "load", str(npy), None, True))


def _npy_with_pickle(pickled: bytes) -> bytes:
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + pickled


def p_functools_partial(env: Env) -> bytes:
    asm = Asm(2).global_("functools", "partial").mark().global_("os", "system")
    asm.str(touch(env.marker)).raw(pickle.TUPLE).reduce().tuple().reduce()
    return finish(asm)


def p_operator_attrgetter(env: Env) -> bytes:
    asm = Asm(2).call("operator", "attrgetter", "system")
    asm.mark().global_("torch", "os").raw(pickle.TUPLE).reduce()
    return finish(_system(asm, env.marker))


def p_operator_methodcaller(env: Env) -> bytes:
    asm = Asm(2).call("operator", "methodcaller", "system", touch(env.marker))
    asm.mark().global_("builtins", "__import__").tuple("os").reduce().raw(pickle.TUPLE)
    return finish(asm.reduce())


def p_copyreg_reconstructor(env: Env) -> bytes:
    # copyreg._reconstructor is allowlisted; the class it is handed is not.
    asm = Asm(2).global_("copyreg", "_reconstructor").mark()
    asm.global_("subprocess", "Popen").global_("subprocess", "Popen")
    asm.value(["touch", env.marker]).raw(pickle.TUPLE).reduce()
    return finish(asm)


def p_copyreg_reconstructor_allowlisted(env: Env) -> bytes:
    # Only allowlisted names, but base.__init__ is a constructor that was never meant to be
    # called this way: _reconstructor(Namespace, OrderedDict, state).
    asm = Asm(2).global_("copyreg", "_reconstructor").mark()
    asm.global_("argparse", "Namespace").global_("collections", "OrderedDict")
    asm.value({"a": 1}).raw(pickle.TUPLE).reduce()
    return finish(asm)


def p_ext1(env: Env) -> bytes:
    return finish(_system(Asm(2).ext(EXTENSIONS[0][0]), env.marker))


def p_ext2(env: Env) -> bytes:
    return finish(_system(Asm(2).ext(EXTENSIONS[1][0]), env.marker))


def p_ext4(env: Env) -> bytes:
    return finish(_system(Asm(2).ext(EXTENSIONS[2][0]), env.marker))


def p_inst(env: Env) -> bytes:
    # Protocol 0: INST pops the marked arguments and calls module.name(*args).
    cmd = touch(env.marker).replace("'", "\\'")
    return b"(S'" + cmd.encode() + b"'\nios\nsystem\n."


def p_obj(env: Env) -> bytes:
    asm = Asm(proto=None).mark().global_("os", "system").str(touch(env.marker))
    return finish(asm.raw(pickle.OBJ))


def p_inst_allowlisted_name(env: Env) -> bytes:
    # INST with an allowlisted-looking module but a dangerous attribute path.
    return b"(S'x'\nitorch\nos.system\n."


CODE_EXEC: dict[str, Callable[[Env], bytes]] = {
    name[2:]: fn for name, fn in dict(globals()).items() if name.startswith("p_")
}
