"""Render a Kustomize directory in Python: the subset of ``kustomize build`` that docker/k8s uses.

No kustomize binary exists on the development machines and no well-kept PyPI package renders
kustomizations, so the tests render ``docker/k8s`` with this module. It implements, as kustomize
does:

* ``resources``: YAML files (several documents each) and directories holding a kustomization,
  rendered recursively (bases and overlays);
* ``images``: ``name`` matched against the image name of every container and init container,
  replaced by ``newName``, ``newTag`` and/or ``digest``;
* ``patches`` given by ``path`` (or inline ``patch``) without ``target``: strategic-merge
  patches that name their target by ``apiVersion``, ``kind`` and ``metadata.name``. Maps merge
  key by key, ``null`` deletes a key, lists merge by their Kubernetes merge key where the API
  declares one (containers by ``name``, env by ``name``, volume mounts by ``mountPath``, ...)
  and are replaced otherwise (tolerations, args, ...), as ``kubectl`` and kustomize do.

Anything else in a kustomization (generators, ``namePrefix``, ``labels``, JSON 6902 patches,
patch directives such as ``$patch``) raises :class:`RenderError` instead of being ignored, so a
manifest change that needs more of kustomize fails the tests rather than rendering wrongly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_KEYS = frozenset({"apiVersion", "kind", "resources", "images", "patches"})

#: Merge keys of the list fields the manifests may patch, by the last two field names of the
#: list's path (Kubernetes API ``patchMergeKey`` tags). A list not listed here is replaced whole.
MERGE_KEYS: dict[tuple[str, str], str] = {
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "ephemeralContainers"): "name",
    ("spec", "volumes"): "name",
    ("spec", "imagePullSecrets"): "name",
    ("spec", "topologySpreadConstraints"): "topologyKey",
    ("spec", "hostAliases"): "ip",
    ("spec", "ports"): "port",  # Service ports (a pod spec has no "ports")
    ("containers", "env"): "name",
    ("containers", "ports"): "containerPort",
    ("containers", "volumeMounts"): "mountPath",
    ("containers", "volumeDevices"): "devicePath",
    ("initContainers", "env"): "name",
    ("initContainers", "ports"): "containerPort",
    ("initContainers", "volumeMounts"): "mountPath",
}


class RenderError(ValueError):
    """The kustomization uses something this renderer does not implement, or is inconsistent."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key repeated in one mapping (kustomize refuses it too)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """Construct a mapping, raising RenderError on a duplicate key instead of keeping the last."""
    keys = [loader.construct_object(key, deep=True) for key, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise RenderError(f"line {node.start_mark.line + 1}: keys {duplicates} are repeated")
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _load_all(text: str) -> list[Any]:
    """Every YAML document of ``text`` (duplicate keys refused)."""
    return list(yaml.load_all(text, Loader=_UniqueKeyLoader))


def render(directory: Path) -> list[dict[str, Any]]:
    """Every object ``kustomize build directory`` would print, in resource order."""
    directory = directory.resolve()
    kustomization = _load_kustomization(directory)
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        for obj in _load_resource(directory, entry):
            if any(_identity(other) == _identity(obj) for other in objects):
                raise RenderError(f"{directory}: {_identity(obj)} is defined twice")
            objects.append(obj)
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, _load_patch(directory, patch))
    for image in kustomization.get("images", []):
        _apply_image(objects, image)
    return objects


def _load_kustomization(directory: Path) -> dict[str, Any]:
    """The directory's kustomization.yaml, refused when it uses keys outside the subset."""
    path = directory / KUSTOMIZATION_FILE
    if not path.is_file():
        raise RenderError(f"{directory}: no {KUSTOMIZATION_FILE}")
    documents = _load_all(path.read_text(encoding="utf-8"))
    data = documents[0] if len(documents) == 1 else None
    if not isinstance(data, dict):
        raise RenderError(f"{path}: not a mapping")
    unsupported = set(data) - SUPPORTED_KEYS
    if unsupported:
        raise RenderError(f"{path}: keys {sorted(unsupported)} are not implemented by tests/k8s_render.py")
    if data.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization")
    return data


def _load_resource(directory: Path, entry: Any) -> list[dict[str, Any]]:
    """The objects of one ``resources`` entry: a YAML file or a kustomization directory."""
    if not isinstance(entry, str) or "://" in entry:
        raise RenderError(f"{directory}: resource {entry!r} must be a local path")
    path = (directory / entry).resolve()
    if path.is_dir():
        return render(path)
    if not path.is_file():
        raise RenderError(f"{directory}: resource {entry!r} does not exist")
    return list(_documents(path))


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    """The non-empty YAML documents of a file, each a Kubernetes object."""
    for document in _load_all(path.read_text(encoding="utf-8")):
        if document is None:
            continue
        if not isinstance(document, dict) or not {"apiVersion", "kind", "metadata"} <= set(document):
            raise RenderError(f"{path}: every document must be an object with apiVersion, kind, metadata")
        yield document


def _load_patch(directory: Path, entry: Any) -> dict[str, Any]:
    """One strategic-merge patch from ``path`` or inline ``patch`` (``target`` is not supported)."""
    if not isinstance(entry, dict) or set(entry) - {"path", "patch"} or len(entry) != 1:
        raise RenderError(f"{directory}: patch {entry!r}: only one of 'path' or 'patch' is implemented")
    if "path" in entry:
        documents = list(_documents((directory / entry["path"]).resolve()))
    else:
        documents = [d for d in _load_all(entry["patch"]) if d is not None]
    if len(documents) != 1:
        raise RenderError(f"{directory}: patch {entry!r} must hold exactly one object")
    return documents[0]


def _identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): how a strategic-merge patch names its target."""
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    """Merge ``patch`` into the one object it names; an unmatched patch is an error (as in kustomize)."""
    matches = [i for i, obj in enumerate(objects) if _identity(obj) == _identity(patch)]
    if len(matches) != 1:
        raise RenderError(f"patch for {_identity(patch)} matches {len(matches)} objects, expected 1")
    index = matches[0]
    objects[index] = strategic_merge(objects[index], patch)


def strategic_merge(original: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """``patch`` merged into ``original`` with Kubernetes strategic-merge semantics (a new value)."""
    if isinstance(patch, dict) and isinstance(original, dict):
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if key.startswith("$"):
                raise RenderError(f"{'.'.join(path)}: patch directive {key!r} is not implemented")
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, (*path, key))
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list) and isinstance(original, list):
        merge_key = MERGE_KEYS.get((path[-2], path[-1])) if len(path) >= 2 else None
        if merge_key is not None:
            return _merge_list(original, patch, merge_key, path)
    return copy.deepcopy(patch)


def _merge_list(original: list[Any], patch: list[Any], key: str, path: tuple[str, ...]) -> list[Any]:
    """Items of ``patch`` merged into the ``original`` item with the same ``key``, or appended."""
    merged = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise RenderError(f"{'.'.join(path)}: every patched item needs its merge key {key!r}")
        position = next(
            (i for i, old in enumerate(merged) if isinstance(old, dict) and old.get(key) == item[key]), None
        )
        if position is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[position] = strategic_merge(merged[position], item, path)
    return merged


def split_image(image: str) -> tuple[str, str]:
    """``(name, suffix)``: the image name and its ``:tag`` and/or ``@digest`` part (may be empty)."""
    name, at, digest = image.partition("@")
    suffix = at + digest
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a colon after the last slash starts the tag (before it: a registry port)
        name, suffix = name[:colon], name[colon:] + suffix
    return name, suffix


def _apply_image(objects: list[dict[str, Any]], image: dict[str, Any]) -> None:
    """Kustomize's image transformer for one ``images`` entry."""
    if (
        not isinstance(image, dict)
        or "name" not in image
        or set(image) - {"name", "newName", "newTag", "digest"}
    ):
        raise RenderError(f"images entry {image!r}: expected name with newName, newTag and/or digest")
    for container in _containers(objects):
        name, suffix = split_image(container["image"])
        if name != image["name"]:
            continue
        if "digest" in image:
            suffix = "@" + image["digest"]
        elif "newTag" in image:
            suffix = ":" + str(image["newTag"])
        container["image"] = image.get("newName", name) + suffix


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container and init container (a mapping with ``image``) anywhere inside ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)
