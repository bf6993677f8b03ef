"""Make the pictures of the README and the Extensions Index from a real MRML scene.

Run it with the project's environment (about 4 minutes of CPU time on two cores, 6.5 minutes
wall time when measured on shared cores; most of it is the segmentation, Slicer's
closed-surface conversion and rendering ~20 million triangles on the CPU)::

    python docs/make_pictures.py            # writes Resources/Screenshots/*.png

What is pictured, and how it is made:

1. **The scan**: the bundled example (``hrpqct demo``'s :func:`example_params` and
   :data:`EXAMPLE_SEED`, a synthetic right leg) with :data:`N_SLICES` slices instead of 168,
   so the run stays short while the 3D view still has some depth.
2. **The segmentation is the pipeline's own result**, not the phantom's truth: the bundled
   SegFormer (``run_segmentation``) and the rule-based post-processing (``postprocess``), as
   ``hrpqct segment`` runs them, written as the ``.seg.nrrd`` that command writes.
3. **The scene is a real MRML scene** (``slicer-core``: Slicer's Qt-free C++ libraries), set
   up as Slicer's application does at start-up (application logic, Colors, Segmentations,
   Subject hierarchy logics; the same set-up as ``Testing/tests/_fixtures_slicer.py``). The
   volume and the segmentation are loaded the way the HR-pQCT Segmenter module loads them:
   ``slicer_bridge.scan_to_volume_node`` (HU, int16, the module's window/level), then the
   ``.seg.nrrd`` through ``slicer_bridge.read_segmentation_file`` (the seven named, coloured
   segments with terminology), ``place_in_subject_hierarchy`` and ``show_in_3d`` (Slicer's
   closed-surface conversion with its default parameters).
4. **Every view is rendered by Slicer's own rendering code, offscreen** (VTK with EGL; no Qt,
   no window):

   * slice views (axial = Red, sagittal = Yellow, coronal = Green): a ``vtkMRMLSliceLogic`` per
     view (its slice node oriented as in Slicer's layouts, the volume as background layer)
     produces the resliced, window/levelled volume image, shown with a ``vtkImageMapper``
     as Slicer's slice view shows it; the segments are drawn on top by Slicer's
     ``vtkMRMLSegmentationsDisplayableManager2D`` (created by the
     ``vtkMRMLSliceViewDisplayableManagerFactory``), with the segmentation's default display
     (fill at 50 % opacity plus outline). The axial view is fitted to the volume (as Slicer
     does on loading) at the middle slice; the sagittal view goes through the tibia's centre,
     the coronal view through the fibula's, both zoomed in (field of view 40 and 52 mm);
   * the 3D view: a ``vtkMRMLViewNode`` from ``vtkMRMLViewLogic``, rendered by the
     ``vtkMRMLThreeDViewDisplayableManagerFactory``'s camera, view (background, box, axis
     labels) and ``vtkMRMLSegmentationsDisplayableManager3D`` displayable managers, showing
     the segments' closed-surface representation. The script sets the camera (an oblique
     view from anterior-superior-right) and then, as Slicer's "reset field of view" does,
     invokes the view node's ``ResetFocalPointRequestedEvent`` so the view manager fits the
     box and axis labels to the data (the volume's bounds).

   Each view is captured with ``vtkWindowToImageFilter`` + ``vtkPNGWriter``.
5. **What is drawn by this script, not by Slicer**: Qt widgets are not part of
   ``slicer-core``, so the views' coloured title bars (view letter, orientation and slice
   position, imitating Slicer's view controllers), the legend of region names and
   colours, and the 2 x 2 arrangement (Slicer's "Four-Up" layout: Red | 3D over
   Yellow | Green) are drawn with Pillow. The sagittal and coronal views are short and wide
   because the stack is only a few millimetres deep.

Outputs (each < 1 MB): ``HRpQCT-regions.png`` (the four views and the legend) and the single
views ``HRpQCT-axial.png``, ``HRpQCT-sagittal.png``, ``HRpQCT-coronal.png``, ``HRpQCT-3d.png``.
Reproducible: fixed seed, fixed views and sizes, no time stamps in the files. ``--cache``
keeps the segmented example between runs when trying out views.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: Where the pictures go (the README and CMakeLists.txt reference them there).
DEFAULT_OUT = REPO / "Resources" / "Screenshots"
#: Slices of the example scan (the bundled example has 168; 64 keep the run to minutes).
N_SLICES = 64
#: Size in pixels of the axial and 3D views; the sagittal and coronal views are as wide and
#: :data:`STRIP_HEIGHT` high.
VIEW_SIZE = 600
STRIP_HEIGHT = 150
#: Field of view (mm) across the sagittal view (centred on the tibia) and the coronal view
#: (through the fibula and the tibia).
STRIP_FOV_MM = 40.0
CORONAL_FOV_MM = 52.0
#: Slicer's view colours (slice controller bars) and the 3D view's name.
VIEW_COLORS = {"Red": (243, 74, 51), "Yellow": (237, 213, 76), "Green": (110, 176, 75),
               "1": (116, 131, 233)}
TITLE_BAR = 24


def _add_engine_to_path() -> None:
    """Make the engine importable from a plain checkout (an installed one needs nothing)."""
    for folder in ("HRpQCTSegmenter", "HRpQCTRadiomics"):
        path = str(REPO / folder)
        if path not in sys.path:
            sys.path.append(path)


# ------------------------------------------------------------------------------------------
# 1-2. the example scan and the pipeline's segmentation
# ------------------------------------------------------------------------------------------
def make_example(n_slices: int, cache: Path | None) -> tuple[Any, np.ndarray]:
    """The example scan and the pipeline's 7-region label map (``[z, y, x]``).

    With ``cache``, a previous run's result is reused when present (and saved when not).
    """
    from HRpQCTCore.scan import Scan

    if cache is not None and cache.exists():
        stored = np.load(cache)
        scan = Scan(hu=stored["hu"], spacing_mm=tuple(stored["spacing"].tolist()),
                    origin_mm=tuple(stored["origin"].tolist()),
                    direction=tuple(stored["direction"].tolist()))
        print(f"reused the segmented example from {cache}")
        return scan, stored["regions"]

    from HRpQCTPhantom import generate_phantom
    from HRpQCTPhantom.example import EXAMPLE_SEED, example_params
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.postprocess import postprocess

    start = time.perf_counter()
    phantom = generate_phantom(example_params(n_slices), seed=EXAMPLE_SEED)
    scan = phantom.scan
    del phantom  # its truth is not pictured
    print(f"made the example scan: {scan.shape[0]} x {scan.shape[1]} x {scan.shape[2]} voxels, "
          f"seed {EXAMPLE_SEED} ({time.perf_counter() - start:.0f} s)", flush=True)
    start = time.perf_counter()
    seg = run_segmentation(scan.hu, resolve_model_folder(None))
    result = postprocess(seg.labels, scan.hu, scan.spacing_mm)
    for warning in result.warnings:
        print(f"   post-processing warning: {warning}")
    print(f"segmented it with the bundled model on {seg.device} ({seg.engine}) and "
          f"post-processed it ({time.perf_counter() - start:.0f} s)", flush=True)
    if cache is not None:
        np.savez(cache, hu=scan.hu, regions=result.regions, spacing=scan.spacing_mm,
                 origin=scan.origin_mm, direction=scan.direction)
    return scan, result.regions


# ------------------------------------------------------------------------------------------
# 3. the MRML scene, loaded as the Slicer module loads it
# ------------------------------------------------------------------------------------------
@dataclass
class Scene:
    scene: Any
    application_logic: Any
    segmentations_logic: Any
    volume_node: Any
    segmentation_node: Any


def _quiet_vtk():
    from contextlib import contextmanager

    import vtk

    @contextmanager
    def quiet():
        previous = vtk.vtkLogger.GetCurrentVerbosityCutoff()
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
        try:
            yield
        finally:
            vtk.vtkLogger.SetStderrVerbosity(previous)

    return quiet()


def build_scene(scan: Any, regions: np.ndarray, work: Path) -> Scene:
    """A headless Slicer scene holding the scan and its segmentation (see module docstring)."""
    import slicer

    from HRpQCTCore import slicer_bridge
    from HRpQCTCore.io.segnrrd import write_seg_nrrd

    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)

    def start(logic: Any) -> Any:
        logic.SetMRMLApplicationLogic(application_logic)
        logic.SetMRMLScene(scene)
        return logic

    with _quiet_vtk():  # the Colors logic looks for default files slicer-core does not ship
        colors_logic = start(slicer.vtkSlicerColorLogic())
    application_logic.SetColorLogic(colors_logic)
    segmentations_logic = start(slicer.vtkSlicerSegmentationsModuleLogic())
    hierarchy_logic = start(slicer.vtkSlicerSubjectHierarchyModuleLogic())
    for name, logic in (("Colors", colors_logic), ("Segmentations", segmentations_logic),
                        ("SubjectHierarchy", hierarchy_logic)):
        application_logic.SetModuleLogic(name, logic)
    slicer.mrmlScene = scene  # for slicer.util helpers, as inside Slicer

    volume_node = slicer_bridge.scan_to_volume_node(scene, scan, "example")
    # The module hands the volume to `hrpqct segment`, which writes a .seg.nrrd; read it back
    # the same way.
    seg_path = work / "example_regions.seg.nrrd"
    write_seg_nrrd(regions, scan, seg_path)  # what `hrpqct segment -o x.seg.nrrd` writes
    segmentation_node = slicer_bridge.read_segmentation_file(scene, seg_path,
                                                             name="example regions")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    slicer_bridge.place_in_subject_hierarchy(segmentation_node, volume_node)
    start_time = time.perf_counter()
    if not slicer_bridge.show_in_3d(segmentation_node):
        raise RuntimeError("Slicer could not make the closed-surface representation")
    print(f"loaded the volume and {segmentation_node.GetSegmentation().GetNumberOfSegments()} "
          f"segments into the scene; closed surfaces made in "
          f"{time.perf_counter() - start_time:.0f} s", flush=True)
    return Scene(scene, application_logic, segmentations_logic, volume_node, segmentation_node)


def region_center_ras(scene: Scene, regions: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """RAS position of the centre of the voxels with the given labels (on the middle slice)."""
    import vtk

    z = regions.shape[0] // 2
    rows, columns = np.nonzero(np.isin(regions[z], labels))
    ijk = [float(columns.mean()), float(rows.mean()), float(z), 1.0]
    matrix = vtk.vtkMatrix4x4()
    scene.volume_node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint(ijk)[:3])


# ------------------------------------------------------------------------------------------
# 4. rendering with Slicer's displayable managers
# ------------------------------------------------------------------------------------------
class OffscreenView:
    """An offscreen render window with one renderer (and an interactor, which the
    displayable managers expect to find, never started)."""

    def __init__(self, width: int, height: int):
        import vtk

        self.renderer = vtk.vtkRenderer()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(8)
        self.window.SetSize(width, height)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.displayable_managers: Any = None

    def save(self, path: Path) -> Path:
        import vtk

        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        return path


def _displayable_managers(factory: Any, application_logic: Any, names: tuple[str, ...],
                          view: OffscreenView, view_node: Any) -> Any:
    import slicer

    factory.SetMRMLApplicationLogic(application_logic)
    for name in names:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, view.renderer)
    if group.GetDisplayableManagerCount() != len(names):
        raise RuntimeError(f"Only {group.GetDisplayableManagerCount()} of the displayable "
                           f"managers {names} could be created")
    group.SetMRMLDisplayableNode(view_node)
    view.displayable_managers = group  # keep it alive while the view renders
    return group


@dataclass
class SliceView:
    """Which slice view to render: Slicer's layout name, orientation, size and framing."""

    layout_name: str
    orientation: str
    width: int
    height: int
    center_ras: np.ndarray | None = None  # None: fit the volume, as Slicer does on loading
    fov_width_mm: float | None = None


def render_slice_view(scene: Scene, spec: SliceView, path: Path) -> tuple[Path, str]:
    """Render one slice view; returns the PNG and the slice position text (e.g. ``S: 1.9mm``)."""
    import slicer
    import vtk

    view = OffscreenView(spec.width, spec.height)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(scene.application_logic)
    logic.SetMRMLScene(scene.scene)
    slice_node = logic.AddSliceNode(spec.layout_name)
    slice_node.SetOrientation(spec.orientation)
    slice_node.SetLayoutColor([c / 255 for c in VIEW_COLORS[spec.layout_name]])
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(scene.volume_node.GetID())
    logic.ResizeSliceNode(spec.width, spec.height)
    logic.FitSliceToAll()
    if spec.center_ras is not None:
        slice_node.JumpSliceByCentering(*spec.center_ras)
    if spec.fov_width_mm is not None:
        fov = slice_node.GetFieldOfView()
        slice_node.SetFieldOfView(spec.fov_width_mm,
                                  spec.fov_width_mm * spec.height / spec.width, fov[2])
    slice_node.UpdateMatrices()
    logic.UpdateImageData()

    # Slicer's slice view shows the slice logic's output image as a 2D actor; the displayable
    # managers add the segments on top.
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(logic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    view.renderer.AddViewProp(actor)
    view.renderer.SetBackground(0, 0, 0)
    _displayable_managers(slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance(),
                          scene.application_logic,
                          ("vtkMRMLSegmentationsDisplayableManager2D",), view, slice_node)
    axis = {"Axial": "S", "Sagittal": "R", "Coronal": "A"}[spec.orientation]
    offset = slice_node.GetSliceOffset()
    if axis == "R" and offset < 0:
        axis, offset = "L", -offset  # Slicer writes positions as R/L, A/P, S/I
    elif axis == "A" and offset < 0:
        axis, offset = "P", -offset
    elif axis == "S" and offset < 0:
        axis, offset = "I", -offset
    return view.save(path), f"{axis}: {offset:.1f}mm"


def render_3d_view(scene: Scene, size: int, path: Path) -> Path:
    """Render the 3D view: the segments' closed surfaces, from anterior-superior-right."""
    import slicer

    view = OffscreenView(size, size)
    view_logic = slicer.vtkMRMLViewLogic()
    view_logic.SetMRMLApplicationLogic(scene.application_logic)
    view_logic.SetMRMLScene(scene.scene)
    view_node = view_logic.AddViewNode("1")
    _displayable_managers(
        slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance(),
        scene.application_logic,
        ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
         "vtkMRMLSegmentationsDisplayableManager3D"),
        view, view_node)
    # As Slicer's "reset field of view" (qMRMLThreeDView::resetFocalPoint) does after loading:
    # frame the data without the box, then ask the view manager to fit the box to the data.
    view_node.SetBoxVisible(False)
    view_node.SetAxisLabelsVisible(False)
    view.window.Render()
    bounds = np.zeros(6)
    scene.segmentation_node.GetRASBounds(bounds)
    center = (bounds[0::2] + bounds[1::2]) / 2
    camera = view.renderer.GetActiveCamera()  # the camera node's camera (camera manager)
    direction = np.array([0.3, 0.65, 1.0])  # towards R, A, S
    camera.SetFocalPoint(*center)
    camera.SetPosition(*(center + 400 * direction / np.linalg.norm(direction)))
    camera.SetViewUp(0, 0, 1)
    view.renderer.ResetCamera(bounds)
    view_node.SetBoxVisible(True)
    view_node.SetAxisLabelsVisible(True)
    view_node.InvokeEvent(slicer.vtkMRMLViewNode.ResetFocalPointRequestedEvent)
    view.window.Render()
    view.renderer.ResetCamera()  # the box (the volume's bounds) and its labels in view
    camera.Zoom(1.45)
    view.renderer.ResetCameraClippingRange()
    return view.save(path)


# ------------------------------------------------------------------------------------------
# 5. the four-up picture
# ------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _with_title_bar(image_path: Path, layout_name: str, title: str, position: str):
    """A slice view with a bar like Slicer's slice controller (letter, name, position)."""
    from PIL import Image, ImageDraw

    view = Image.open(image_path).convert("RGB")
    framed = Image.new("RGB", (view.width, view.height + TITLE_BAR), VIEW_COLORS[layout_name])
    framed.paste(view, (0, TITLE_BAR))
    draw = ImageDraw.Draw(framed)
    font = _font(15)
    draw.text((8, TITLE_BAR // 2), f"{layout_name[0]}   {title}", fill=(0, 0, 0), font=font,
              anchor="lm")
    draw.text((view.width - 8, TITLE_BAR // 2), position, fill=(0, 0, 0), font=font,
              anchor="rm")
    return framed


def _legend(width: int):
    from PIL import Image, ImageDraw

    from HRpQCTCore.regions import REGIONS

    columns = 4
    row_height = 26
    rows = -(-len(REGIONS) // columns)
    legend = Image.new("RGB", (width, rows * row_height + 40), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    font = _font(15)
    cell = width // columns
    for index, region in enumerate(REGIONS):
        x = 12 + (index % columns) * cell
        y = 8 + (index // columns) * row_height
        color = tuple(round(255 * c) for c in region.color_float)
        draw.rectangle((x, y + 3, x + 16, y + 19), fill=color, outline=(60, 60, 60))
        draw.text((x + 24, y + 11), region.name, fill=(0, 0, 0), font=font, anchor="lm")
    draw.text((12, legend.height - 14),
              "HR-pQCT Segmenter on the bundled synthetic example scan (hrpqct demo), rendered "
              "by Slicer's MRML displayable managers. Research use only.",
              fill=(90, 90, 90), font=_font(13), anchor="lm")
    return legend


def compose(views: dict[str, Any], out: Path) -> Path:
    """Slicer's Four-Up layout (Red | 3D over Yellow | Green) and a legend, in one PNG."""
    from PIL import Image

    red, yellow, green, three_d = (views[name] for name in ("Red", "Yellow", "Green", "1"))
    gap = 2
    width = red.width + gap + three_d.width
    top = max(red.height, three_d.height)
    bottom = max(yellow.height, green.height)
    legend = _legend(width)
    picture = Image.new("RGB", (width, top + gap + bottom + gap + legend.height), (40, 40, 40))
    picture.paste(red, (0, 0))
    picture.paste(three_d, (red.width + gap, top - three_d.height))
    picture.paste(yellow, (0, top + gap))
    picture.paste(green, (red.width + gap, top + gap))
    picture.paste(legend, (0, top + gap + bottom + gap))
    return _save_small(picture, out)


def _save_small(picture: Any, path: Path, limit: int = 1_000_000) -> Path:
    """Save as PNG; if over ``limit`` bytes, with a 256-colour palette instead."""
    from PIL import Image

    picture.save(path, optimize=True)
    if path.stat().st_size > limit:
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                         dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the PNGs (default: Resources/Screenshots)")
    parser.add_argument("--slices", type=int, default=N_SLICES,
                        help="slices of the example scan (default %(default)s)")
    parser.add_argument("--cache", type=Path,
                        help="an .npz to keep the segmented example in and reuse on the next "
                             "run (for trying out views; not needed otherwise)")
    args = parser.parse_args(argv)
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    _add_engine_to_path()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    scan, regions = make_example(args.slices, args.cache)
    from HRpQCTCore.regions import region_by_name

    tibia, fibula = (tuple(region_by_name(f"{bone} {part} bone").label
                           for part in ("cortical", "trabecular"))
                     for bone in ("Tibial", "Fibular"))
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="hrpqct-pictures-") as work:
        scene = build_scene(scan, regions, Path(work))
        del scan
        tibia_center = region_center_ras(scene, regions, tibia)
        fibula_center = region_center_ras(scene, regions, fibula)
        # sagittal: through the tibia's centre; coronal: through the fibula's, showing both bones
        both_bones = np.array([(tibia_center[0] + fibula_center[0]) / 2, fibula_center[1],
                               tibia_center[2]])
        specs = {
            "Red": (SliceView("Red", "Axial", VIEW_SIZE, VIEW_SIZE), "Axial", "axial"),
            "Yellow": (SliceView("Yellow", "Sagittal", VIEW_SIZE, STRIP_HEIGHT, tibia_center,
                                 STRIP_FOV_MM), "Sagittal", "sagittal"),
            "Green": (SliceView("Green", "Coronal", VIEW_SIZE, STRIP_HEIGHT, both_bones,
                                CORONAL_FOV_MM), "Coronal", "coronal"),
        }
        framed = {}
        for layout_name, (spec, title, stem) in specs.items():
            raw = Path(work) / f"{stem}.png"
            t = time.perf_counter()
            _, position = render_slice_view(scene, spec, raw)
            print(f"rendered the {stem} view ({time.perf_counter() - t:.0f} s)", flush=True)
            framed[layout_name] = _with_title_bar(raw, layout_name, title, position)
            written.append(_save_small(framed[layout_name], args.out / f"HRpQCT-{stem}.png"))
        t = time.perf_counter()
        raw_3d = render_3d_view(scene, VIEW_SIZE, Path(work) / "3d.png")
        print(f"rendered the 3D view ({time.perf_counter() - t:.0f} s)", flush=True)

        framed["1"] = _with_title_bar(raw_3d, "1", "3D", "")
        written.append(_save_small(framed["1"], args.out / "HRpQCT-3d.png"))
        written.insert(0, compose(framed, args.out / "HRpQCT-regions.png"))
        scene.scene.Clear(True)

    for path in written:
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
              f"({path.stat().st_size / 1024:.0f} KiB)")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
