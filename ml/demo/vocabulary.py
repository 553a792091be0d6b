"""The tag vocabulary of the procedural demo dataset.

Three families of tags describe each drawn object:

- shapes (category ``general``) in a hierarchy ``shape > circle`` and
  ``shape > polygon > square | triangle | star``, plus two colour-shape tags in the style of
  ``red_dress -> dress``: ``red_circle -> circle`` and ``blue_star -> star``;
- colours (category ``attribute``): ``red``, ``green``, ``blue``, ``yellow``;
- textures (category ``attribute``): ``patterned > striped | dotted | checkered``.

A child tag implies its parent: an object tagged ``red_circle`` is also a ``circle`` and a
``shape``, so a parent's mask always contains the masks of its children. ``shape``, ``polygon``
and ``patterned`` are exhaustive (their mask is exactly the union of their children's); ``circle``
and ``star`` are not (a green circle is a ``circle`` but no ``red_circle``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoTag:
    """One tag of the demo vocabulary, as the importer reads it from ``vocabulary.json``."""

    name: str
    display_name: str
    category: str
    parent: str | None
    aliases: tuple[str, ...]
    description: str
    exhaustive: bool = False  # every instance is one of its children's (see the module doc)


VOCABULARY: tuple[DemoTag, ...] = (
    DemoTag(
        "shape",
        "Shape",
        "general",
        None,
        (),
        "Any foreground shape, whatever its form.",
        exhaustive=True,
    ),
    DemoTag(
        "polygon",
        "Polygon",
        "general",
        "shape",
        (),
        "A shape with straight edges: a square, a triangle or a star.",
        exhaustive=True,
    ),
    DemoTag("circle", "Circle", "general", "shape", ("disc", "round"), "A filled circle."),
    DemoTag("square", "Square", "general", "polygon", (), "A filled square, possibly rotated."),
    DemoTag("triangle", "Triangle", "general", "polygon", (), "A filled equilateral triangle."),
    DemoTag("star", "Star", "general", "polygon", ("star_shape",), "A filled five-pointed star."),
    DemoTag(
        "red_circle",
        "Red circle",
        "general",
        "circle",
        (),
        "A circle whose colour is red (plain or patterned).",
    ),
    DemoTag(
        "blue_star",
        "Blue star",
        "general",
        "star",
        (),
        "A star whose colour is blue (plain or patterned).",
    ),
    DemoTag("red", "Red", "attribute", None, (), "An object painted in saturated red."),
    DemoTag("green", "Green", "attribute", None, (), "An object painted in saturated green."),
    DemoTag("blue", "Blue", "attribute", None, (), "An object painted in saturated blue."),
    DemoTag("yellow", "Yellow", "attribute", None, (), "An object painted in saturated yellow."),
    DemoTag(
        "patterned",
        "Patterned",
        "attribute",
        None,
        ("textured",),
        "An object covered by a visible pattern in a darker shade of its colour.",
        exhaustive=True,
    ),
    DemoTag(
        "striped",
        "Striped",
        "attribute",
        "patterned",
        ("stripes", "stripy"),
        "An object with parallel stripes in a darker shade of its colour.",
    ),
    DemoTag(
        "dotted",
        "Dotted",
        "attribute",
        "patterned",
        ("polka_dots", "spotted"),
        "An object with a lattice of dots in a darker shade of its colour.",
    ),
    DemoTag(
        "checkered",
        "Checkered",
        "attribute",
        "patterned",
        ("checkerboard", "chequered"),
        "An object with a checkerboard in a darker shade of its colour.",
    ),
)

_BY_NAME: dict[str, DemoTag] = {tag.name: tag for tag in VOCABULARY}
_BY_ALIAS: dict[str, str] = {alias: tag.name for tag in VOCABULARY for alias in tag.aliases}
_ORDER: dict[str, int] = {tag.name: index for index, tag in enumerate(VOCABULARY)}


def tag_names() -> tuple[str, ...]:
    """Return the canonical tag names in vocabulary order."""
    return tuple(tag.name for tag in VOCABULARY)


def get_tag(name: str) -> DemoTag:
    """Return the tag called ``name`` (canonical name only); raise a helpful ``KeyError``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise KeyError(f"unknown demo tag {name!r}; known tags: {known}") from None


def resolve_tag(name_or_alias: str) -> str:
    """Return the canonical name of a tag given its name or one of its aliases."""
    if name_or_alias in _BY_NAME:
        return name_or_alias
    if name_or_alias in _BY_ALIAS:
        return _BY_ALIAS[name_or_alias]
    raise KeyError(f"{name_or_alias!r} is neither a demo tag nor an alias of one")


def ancestors(name: str) -> tuple[str, ...]:
    """Return the parents of ``name``, nearest first (``red_circle`` -> circle, shape)."""
    chain: list[str] = []
    parent = get_tag(name).parent
    while parent is not None:
        chain.append(parent)
        parent = get_tag(parent).parent
    return tuple(chain)


def with_ancestors(names: Iterable[str]) -> tuple[str, ...]:
    """Return ``names`` plus everything they imply, without repeats, in vocabulary order."""
    closed = {implied for name in names for implied in (name, *ancestors(name))}
    return tuple(sorted(closed, key=_ORDER.__getitem__))


def children(name: str) -> tuple[str, ...]:
    """Return the tags whose parent is ``name``, in vocabulary order."""
    get_tag(name)
    return tuple(tag.name for tag in VOCABULARY if tag.parent == name)
