"""A stand-in for ``Panel.layout`` in panel-draw tests (headless Blender has no UI to draw into)."""

from __future__ import annotations


class RecordingLayout:
    """Records a panel's draw calls as ``(kind, value)`` in ``log``; checks that every property and operator
    it names exists, that a label not meant for translation carries no stray whitespace, and that every
    property set on an operator button exists on that operator."""

    def __init__(self, log: list):
        self.log, self.alert, self.enabled, self.active = log, False, True, True

    def box(self, **_kw) -> RecordingLayout:
        return RecordingLayout(self.log)

    row = column = box

    def label(self, text="", icon="NONE", translate=True):  # noqa: ARG002
        assert translate or text == text.strip(), text
        self.log.append(("label", text))

    def prop(self, data, name, **_kw):
        assert name in data.bl_rna.properties, f"{data} has no property {name}"
        self.log.append(("prop", name))

    def operator(self, idname, **_kw):
        import bpy

        mod, name = idname.split(".")
        rna = getattr(getattr(bpy.ops, mod), name).get_rna_type()
        self.log.append(("operator", idname))
        return type("Props", (), {"__setattr__": lambda s, k, v: rna.properties[k]})()
