"""Where the add-on's panels live: the EX-4D tab of the 3D Viewport's sidebar (N-panel). Mixins for
``bpy.types.Panel`` subclasses (listed first in the bases), so every panel module says it once."""

from __future__ import annotations


class SidebarPanel:
    """A panel in the sidebar's EX-4D tab."""

    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "EX-4D"


class SubPanel(SidebarPanel):
    """A closed-by-default sub-panel of the main EX-4D panel."""

    bl_parent_id = "EX4D_PT_main"
    bl_options = {"DEFAULT_CLOSED"}
