"""`pull`: a hub GGUF repo, a hub safetensors repo (downloaded, converted, quantized, checked) or
a local GGUF becomes one model in the models folder, with its manifest, or nothing at all.

Every byte is written inside the hidden `.pulls/ID/` folder first; only a verified file is renamed
into the models folder (a split model's first part last, so it never shows incomplete). Partial
downloads stay in `.pulls/` and are resumed by the next pull of the same model. Free space for the
whole job (download, intermediate, result) is checked before the first byte. One process at a
time works on a model: a lock file in `.pulls/` makes a second pull (CLI or daemon) wait. A
verified file is installed before it is on the disk; durability.py makes it so afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from appliance import __version__
from appliance.library.download import CANCELLED, Cancel, Cancelled, download, hash_file
from appliance.library.durability import DamagedModel, page_cache_epoch, settle
from appliance.library.errors import (
    BadReference,
    ModelExists,
    ModelInUse,
    NotEnoughSpace,
    PullFailed,
)
from appliance.library.hub import Hub, HubFile, HubPlan, safe_stem
from appliance.library.manifest import (
    STAGING,
    FileRecord,
    Installed,
    Manifest,
    find,
    manifest_path,
    model_lock,
    split_id,
    write_manifest,
)
from appliance.library.progress import Progress, Reporter, Throttle, ignore
from appliance.library.refs import HubRef, LocalRef, check_model_id, parse_ref

log = logging.getLogger(__name__)

FreeSpace = Callable[[Path], int]
REMOVE_WAIT_S = 3.0  # a removal waits this long for the model's lock (a settle's moment)
SLACK = 64 * 2**20  # headroom for manifests, the filesystem's own needs, a log line or two
BITS_PER_WEIGHT_FALLBACK = 5.0


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class PullPlan:
    """What a pull will do, decided before any byte is written (`--dry-run` shows this)."""

    ref: HubRef | LocalRef
    kind: str  # "gguf", "safetensors" or "local"
    model_id: str
    quant: str | None
    download_bytes: int  # what still has to come over the network (or be copied)
    result_bytes: int  # the model's size on disk once done
    need_bytes: int  # free space the whole job needs (download + intermediate + result)
    hub: HubPlan | None = None
    local_files: list[Path] = field(default_factory=list)
    up_to_date: bool = False  # the same files are installed already

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "kind": self.kind, "source": str(self.ref),
                "quant": self.quant, "download_bytes": self.download_bytes,
                "size": self.result_bytes, "need_bytes": self.need_bytes,
                "up_to_date": self.up_to_date,
                "revision": self.hub.commit if self.hub else None,
                "files": [f.name for f in self.hub.files] if self.hub
                else [str(p) for p in self.local_files],
                "quants": self.hub.quants if self.hub else []}


class Library:
    """The models folder as a library: plan, pull, remove."""

    def __init__(self, models_dir: Path, *, hub: Hub | None = None,
                 free_space: FreeSpace = disk_free, local_root: Path | None = None,
                 threads: int | None = None) -> None:
        self.models_dir = models_dir
        self.hub = hub or Hub()
        self.free_space = free_space  # injectable: tests simulate a full disk with it
        # None: any local path may be imported (the CLI); a folder: only paths under it (the API).
        self.local_root = local_root
        self.threads = threads

    # -- planning --------------------------------------------------------------------------

    def staging(self, model_id: str) -> Path:
        return self.models_dir / STAGING / model_id

    def plan(self, ref_text: str, quant: str | None = None,
             revision: str | None = None) -> PullPlan:
        ref = parse_ref(ref_text, quant, revision)
        if isinstance(ref, LocalRef):
            return self._plan_local(ref)
        hub_plan = self.hub.plan(ref)
        staging = self.staging(hub_plan.model_id)
        present = sum(_partial_size(staging, f) for f in hub_plan.files)
        download = hub_plan.download_bytes - present
        if hub_plan.kind == "gguf":
            result = hub_plan.download_bytes
            need = download
        else:
            weights = sum(f.size for f in hub_plan.files if f.name.endswith(".safetensors"))
            # bf16/f16 checkpoints: 2 bytes a parameter; the intermediate keeps that width.
            result = int(weights / 2 * _bits(hub_plan.quant) / 8)
            need = download + weights + result
        plan = PullPlan(ref, hub_plan.kind, hub_plan.model_id, hub_plan.quant, download, result,
                        need, hub=hub_plan)
        plan.up_to_date = self._up_to_date(plan)
        return plan

    def _plan_local(self, ref: LocalRef) -> PullPlan:
        path = Path(os.path.abspath(ref.path))
        if self.local_root is not None:
            root = self.local_root.resolve()
            if not _is_under(path.resolve(), root):
                raise BadReference("local paths are imported over the API only from inside the "
                                   f"models folder ({root})",
                                   "copy the file there, or run `appliance pull PATH` on this "
                                   "machine", "model")
        if path.is_dir():
            files = sorted(path.glob("*.gguf"))
            ids = {split_id(f.stem)[0] for f in files}
            if len(ids) != 1:
                raise BadReference(f"{path} holds {len(ids)} GGUF models; give the file",
                                   "e.g. appliance pull ./folder/model-q4_k_m.gguf", "model")
        elif path.is_file() and path.suffix.lower() == ".gguf":
            mid, part = split_id(path.stem)
            files = [path]
            if part:
                files = sorted(f for f in path.parent.glob("*.gguf")
                               if split_id(f.stem)[0] == mid)
        else:
            raise BadReference(f"{path}: no such .gguf file or folder",
                               "give a .gguf file, a folder with one, or a hub repo id", "model")
        model_id = safe_stem(split_id(files[0].stem)[0])
        size = sum(f.stat().st_size for f in files)
        linkable = all(f.stat().st_dev == _device(self.models_dir) for f in files)
        from appliance.library.hub import quant_of

        plan = PullPlan(ref, "local", model_id, quant_of(files[0].name), size, size,
                        0 if linkable else size, local_files=files)
        existing = find(self.models_dir, model_id)
        plan.up_to_date = existing is not None and [f.resolve() for f in existing.files] == [
            f.resolve() for f in files]
        return plan

    def _up_to_date(self, plan: PullPlan) -> bool:
        existing = find(self.models_dir, plan.model_id)
        if existing is None or existing.manifest is None or plan.hub is None:
            return False
        m = existing.manifest
        return (m.repo == plan.hub.repo and m.quant == plan.quant
                and (plan.kind != "gguf" or [r.sha256 for r in m.files]
                     == [f.sha256 for f in plan.hub.files]) and existing.complete)

    def check_space(self, plan: PullPlan) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        free = self.free_space(self.models_dir)
        need = plan.need_bytes + SLACK
        if free < need:
            raise NotEnoughSpace(
                f"not enough free disk space for {plan.model_id}: it needs {need / 2**30:.1f} "
                f"GiB (download, intermediate and result), {free / 2**30:.1f} GiB are free in "
                f"{self.models_dir}", "free some space, or choose a smaller --quant; "
                "`appliance du` shows what the models take")

    # -- pulling ---------------------------------------------------------------------------

    def pull(self, plan: PullPlan, report: Reporter = ignore,
             cancel: Cancel | None = None, force: bool = False) -> Installed:
        """Carry out a plan; on any failure nothing new is left in the models folder."""
        with self._locked(plan.model_id, report):
            existing = self._settled(plan.model_id)
            # An incomplete split model is what an install cut short left: it is replaced.
            if existing is not None and not force and existing.complete:
                if self._up_to_date(plan) or (plan.kind == "local" and plan.up_to_date):
                    report(Progress("done", "success", model=plan.model_id))
                    return existing
                source = existing.manifest.source_line if existing.manifest else "added by hand"
                raise ModelExists(f"a different model {plan.model_id} is installed ({source})",
                                  "remove it first (appliance rm), or pull with --force",
                                  "model")
            self.check_space(plan)
            if plan.kind == "gguf":
                installed = self._pull_gguf(plan, report, cancel)
            elif plan.kind == "safetensors":
                installed = self._pull_converted(plan, report, cancel)
            else:
                installed = self._import_local(plan, report)
            if existing is not None:  # --force replaced it: drop files the new one lacks
                for old in existing.files:
                    if old not in installed.files:
                        old.unlink(missing_ok=True)
            shutil.rmtree(self.staging(plan.model_id), ignore_errors=True)
            report(Progress("done", "success", model=plan.model_id))
            return installed

    @contextlib.contextmanager
    def _locked(self, model_id: str, report: Reporter) -> Iterator[None]:
        with model_lock(self.models_dir, model_id, lambda: report(
                Progress("resolve", f"waiting for another pull of {model_id}"))):
            yield

    def _settled(self, model_id: str) -> Installed | None:
        """The installed model of that id, checked first where a restart came before it was on
        the disk (a damaged one is removed: the pull installs it again)."""
        try:
            settle(self.models_dir, model_id, lock_held=True)
        except DamagedModel as e:
            log.warning("%s", e.message)
        return find(self.models_dir, model_id)

    def _download_all(self, plan: HubPlan, folder: Path, report: Reporter,
                      cancel: Cancel | None) -> list[tuple[HubFile, Path, str]]:
        """Every file of the plan into `folder` (partials resumed), each checked."""
        throttle = Throttle(report)
        total = plan.download_bytes
        done_before = 0
        results = []
        headers = self.hub.headers()
        for f in plan.files:
            partial = _partial_path(folder, f)
            digest_text = f"sha256:{f.sha256}" if f.sha256 else None

            def on_bytes(n: int, base: int = done_before, d: str | None = digest_text,
                         name: str = f.name) -> None:
                throttle(Progress("download", f"pulling {name}", base + n, total, d))

            digest = download(self.hub.file_url(plan.repo, f.name, plan.commit), partial,
                              size=f.size, sha256=f.sha256, headers=headers, repo=plan.repo,
                              on_bytes=on_bytes, cancel=cancel)
            done_before += f.size
            throttle(Progress("download", f"pulling {f.name}", done_before, total, digest_text),
                     force=True)
            results.append((f, partial, digest))
        return results

    def _pull_gguf(self, plan: PullPlan, report: Reporter,
                   cancel: Cancel | None) -> Installed:
        from appliance.gguf_info import GGUFError, read_gguf_info

        assert plan.hub is not None
        hub = plan.hub
        report(Progress("resolve", "pulling manifest", model=plan.model_id))
        staging = self.staging(plan.model_id)
        files = self._download_all(hub, staging, report, cancel)
        report(Progress("verify", "verifying sha256 digest", model=plan.model_id))
        try:
            read_gguf_info(files[0][1])
        except GGUFError as e:
            for _, partial, _ in files:
                partial.unlink(missing_ok=True)
            raise PullFailed(f"{hub.files[0].name} from {hub.repo} is not a usable GGUF ({e}); "
                             "it was deleted", "report it to the repo's owner") from None
        report(Progress("install", "writing manifest", model=plan.model_id))
        targets = [self.models_dir / name for name in hub.local_names]
        manifest = Manifest(plan.model_id, "hub", [
            FileRecord(t.name, f.size, digest, _inode(partial))
            for (f, partial, digest), t in zip(files, targets, strict=True)],
            quant=hub.quant, repo=hub.repo, revision=hub.commit,
            hub_files=[f.name for f in hub.files],
            unsynced_in=page_cache_epoch(self.models_dir))
        # Later parts first, the first part last: the model appears whole or not at all.
        self._install(manifest, list(reversed([(partial, target) for (_, partial, _), target
                                               in zip(files, targets, strict=True)])))
        return Installed(plan.model_id, targets, manifest)

    def _pull_converted(self, plan: PullPlan, report: Reporter,
                        cancel: Cancel | None) -> Installed:
        assert plan.hub is not None
        hub = plan.hub
        report(Progress("resolve", "pulling manifest", model=plan.model_id))
        staging = self.staging(plan.model_id)
        source = staging / "source"
        files = self._download_all(hub, source, report, cancel)
        for f, partial, _ in files:  # the converter reads the files by their own names
            target = source / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            # A link, not a move: the partial stays whole, so a pull cancelled while converting
            # resumes without downloading again (the staging folder goes once it is done).
            os.link(partial, target)
        if cancel is not None and cancel.is_set():
            raise Cancelled(CANCELLED)
        result = self._convert(plan, source, staging, report, cancel)
        target = self.models_dir / f"{plan.model_id}.gguf"
        report(Progress("install", "writing manifest", model=plan.model_id))
        digest = hash_file(result).hexdigest()
        manifest = Manifest(plan.model_id, "hub+convert",
                            [FileRecord(target.name, result.stat().st_size, digest,
                                        _inode(result))],
                            quant=hub.quant, repo=hub.repo, revision=hub.commit,
                            hub_files=[f.name for f in hub.files],
                            converter_version=f"qwen-appliance {__version__}",
                            unsynced_in=page_cache_epoch(self.models_dir))
        self._install(manifest, [(result, target)])
        return Installed(plan.model_id, [target], manifest)

    def _install(self, manifest: Manifest, moves: list[tuple[Path, Path]]) -> None:
        """Move checked files into place, after their manifest (durable, marked: the files may
        not be on the disk yet, and it names each one's inode; durability.py). Models are listed
        by their files, so a new model's manifest waits unseen, and the model appears with its
        source. An update replaces each file in one rename (a loaded model keeps serving from
        its open file); stopped between, the old file stands under the new manifest, whose
        inodes say it is not the one installed, so it is checked before any use."""
        write_manifest(self.models_dir, manifest)
        for source, target in moves:
            os.replace(source, target)

    def _convert(self, plan: PullPlan, source: Path, staging: Path, report: Reporter,
                 cancel: Cancel | None = None) -> Path:
        """source folder → unquantized GGUF → quantized GGUF → checked; returns the file."""
        from appliance.gguf_info import GGUFError, read_gguf_info
        from converter.errors import ConversionError
        from converter.quantize import quantize
        from converter.verify import check_tokenizer
        from converter.writer import OutType, plan_conversion, write_gguf

        quant = plan.quant or "Q4_K_M"
        out = staging / "quantized.tmp"
        try:
            conversion = plan_conversion(source, OutType.AUTO)
            direct = quant == conversion.out_type.name
            intermediate = out if direct else staging / "intermediate.tmp"
            total = conversion.output_bytes
            done = 0
            throttle = Throttle(report)

            def on_tensor(job: Any, _: int) -> None:
                nonlocal done
                if cancel is not None and cancel.is_set():  # between tensors: a clean stop
                    raise Cancelled(CANCELLED)
                done += job.nbytes
                throttle(Progress("convert", "converting", done, total, model=plan.model_id))

            report(Progress("convert", "converting", 0, total, model=plan.model_id))
            try:
                write_gguf(conversion, intermediate, on_tensor=on_tensor)
            finally:
                conversion.checkpoint.close()
            if not direct:
                report(Progress("quantize", f"quantizing to {quant}", model=plan.model_id))
                quantize(intermediate, out, quant,
                         lambda n, t: throttle(Progress("quantize", f"quantizing to {quant}", n, t,
                                                        model=plan.model_id)), self.threads)
                intermediate.unlink(missing_ok=True)
            report(Progress("verify", "checking the tokenizer", model=plan.model_id))
            read_gguf_info(out)
            check = check_tokenizer(out, source)
            if not check.passed:
                raise PullFailed(f"the converted {plan.model_id} tokenizes differently from "
                                 f"{plan.hub.repo if plan.hub else source}: "
                                 + "; ".join(check.lines[:2]), "report it with the repo name")
        except (ConversionError, GGUFError) as e:
            raise PullFailed(f"converting {plan.model_id} failed: {e}",
                             getattr(e, "hint", "") or "see the daemon log") from None
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out

    def _import_local(self, plan: PullPlan, report: Reporter) -> Installed:
        """Hard link (same disk: instant, no space) or copy the files in, each checked."""
        from appliance.gguf_info import GGUFError, read_gguf_info

        try:
            read_gguf_info(plan.local_files[0])
        except GGUFError as e:
            raise BadReference(f"{plan.local_files[0]} is not a usable GGUF: {e}",
                               "check the file", "model") from None
        staging = self.staging(plan.model_id)
        staging.mkdir(parents=True, exist_ok=True)
        throttle = Throttle(report)
        total = sum(f.stat().st_size for f in plan.local_files)
        done = 0
        temps: list[tuple[Path, Path, str]] = []
        for source in plan.local_files:
            _, part = split_id(source.stem)
            name = (f"{plan.model_id}-{source.stem[-14:].lower()}.gguf" if part
                    else f"{plan.model_id}.gguf")
            temp = staging / f"{name}.tmp"
            temp.unlink(missing_ok=True)
            try:
                os.link(source, temp)
                report(Progress("install", f"linking {source.name}", model=plan.model_id))
                digest = hash_file(temp).hexdigest()
                done += temp.stat().st_size
            except OSError:  # another filesystem (or no links there): copy
                digest = _copy(source, temp, lambda n, base=done, src=source: throttle(
                    Progress("download", f"copying {src.name}", base + n, total)))
                done += temp.stat().st_size
            temps.append((temp, self.models_dir / name, digest))
        report(Progress("install", "writing manifest", model=plan.model_id))
        manifest = Manifest(plan.model_id, "local",
                            [FileRecord(t.name, s.stat().st_size, d, _inode(s))
                             for s, t, d in temps],
                            quant=plan.quant, origin_path=str(plan.local_files[0]),
                            unsynced_in=page_cache_epoch(self.models_dir))
        self._install(manifest, [(s, t) for s, t, _ in reversed(temps)])
        return Installed(plan.model_id, [t for _, t, _ in temps], manifest)

    # -- removing --------------------------------------------------------------------------

    def remove(self, model_id: str) -> Installed:
        from appliance.errors import ModelNotFound

        mid = check_model_id(model_id)
        # Under the model's lock: a settle finishing meanwhile cannot write its manifest back.
        # A settle holds it for a moment; a pull (from the CLI too) for minutes: refused then.
        with model_lock(self.models_dir, mid, wait_s=REMOVE_WAIT_S) as held:
            if not held:
                raise ModelInUse(f"{mid} is being pulled; remove it once the pull has ended",
                                 param="id")
            model = find(self.models_dir, mid)
            if model is None:
                raise ModelNotFound(f"model {model_id!r} is not installed in {self.models_dir}",
                                    param="id")
            model.removed_bytes = model.size
            for path in model.files:  # the first part first: the model vanishes at once
                path.unlink(missing_ok=True)
            manifest_path(self.models_dir, mid).unlink(missing_ok=True)
            shutil.rmtree(self.staging(mid), ignore_errors=True)
        return model


def _bits(quant: str) -> float:
    from converter.quantize import BITS_PER_WEIGHT

    return BITS_PER_WEIGHT.get(quant, BITS_PER_WEIGHT_FALLBACK)


def _partial_path(folder: Path, f: HubFile) -> Path:
    # Named by content where the hub gives a sha256: a changed file upstream never resumes
    # onto the old bytes.
    key = f.sha256 or safe_stem(PurePosixPath(f.name).name)
    return folder / f"{key}.partial"


def _partial_size(folder: Path, f: HubFile) -> int:
    path = _partial_path(folder, f)
    try:
        return min(path.stat().st_size, f.size)
    except OSError:
        return 0


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def _inode(path: Path) -> int:
    return path.stat().st_ino  # a rename keeps it


def _device(folder: Path) -> int:
    probe = folder if folder.exists() else folder.parent
    return probe.stat().st_dev


def _copy(source: Path, target: Path, on_bytes: Callable[[int], None]) -> str:
    import hashlib

    sha = hashlib.sha256()
    done = 0
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(4 * 2**20):
            dst.write(chunk)
            sha.update(chunk)
            done += len(chunk)
            on_bytes(done)
    return sha.hexdigest()
