"""Slicer module files compile without Slicer; the engine packages stay free of GUI imports.

Only the module files (the top-level ``.py`` files of ``HRpQCTSegmenter/`` and
``HRpQCTRadiomics/``: the two panels and the hidden Scanco reader module) may use Slicer's
application layer (``slicer.app``, ``slicer.modules``, ``slicer.util``, ``qt``, ``ctk``). The
engine packages run in plain Python (command line, CI, workers without a display). Two engine
modules, :mod:`HRpQCTCore.slicer_bridge` and :mod:`HRpQCTRadiomicsLib.slicer_radiomics`,
talk to Slicer's Qt-free data model: they may import ``slicer``/``vtk`` *inside functions* (so
the engine imports without Slicer), and still never the application layer.

Module files need the Slicer application to import, so they are checked statically: they
compile, each is a module Slicer can load (a ``ScriptedLoadableModule`` class named like the
file; a file reader named ``<file>FileReader``, the only name Slicer looks for), their ``.ui``
has every widget they use, and their Logic calls the engine functions the CI tests exercise.
"""

import ast
import py_compile
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The two modules with a panel (Module, Widget, Logic, Test classes and a .ui file).
MODULE_FILES = ["HRpQCTSegmenter/HRpQCTSegmenter.py", "HRpQCTRadiomics/HRpQCTRadiomics.py"]
#: Every scripted module file: each top-level .py of a module folder is loaded by Slicer as a
#: module of its own.
ALL_MODULE_FILES = sorted(p.relative_to(REPO_ROOT).as_posix()
                          for folder in ("HRpQCTSegmenter", "HRpQCTRadiomics")
                          for p in (REPO_ROOT / folder).glob("*.py"))
#: Methods Slicer calls on a scripted file reader (canLoadFileConfidence is optional).
FILE_READER_METHODS = {"description", "fileType", "extensions", "canLoadFile", "load"}
#: Module Logic method -> the engine function it must call (the one the CI tests run).
LOGIC_CALLS = {
    "HRpQCTSegmenter/HRpQCTSegmenter.py": {
        "parameters": "SegmenterParameters.from_parameter_node",
        "ensureDependencies": "ensure_dependencies",
        "startSegmentation": "start_segmentation",
        "process": "run_segmentation",
        # "Improve the model" (HRpQCTSegmenterLib.improve, tested in test_slicer_improve.py)
        "addToTrainingSet": "add_corrected_node",
        "trainingSetSummary": "training_set_summary",
        "startFineTuning": "start_fine_tune_run",
        "selectModel": "parameters_for_model",
    },
    "HRpQCTRadiomics/HRpQCTRadiomics.py": {
        "parameters": "RadiomicsParameters.from_parameter_node",
        "ensureDependencies": "ensure_dependencies",
        "startRun": "start_radiomics",
        "process": "run_radiomics",
        "exportCsv": "write_features_csv",
    },
}
#: Every Python package of the two module folders (the core, the engines, the pipeline and
#: the modules' Qt-free logic): none of them may import the GUI.
ENGINE_PACKAGES = sorted(p.parent.relative_to(REPO_ROOT).as_posix()
                         for folder in ("HRpQCTSegmenter", "HRpQCTRadiomics")
                         for p in (REPO_ROOT / folder).glob("*/__init__.py"))
#: Modules allowed to import Slicer's Qt-free core (slicer, vtk) lazily.
SLICER_CORE_BRIDGES = {"HRpQCTSegmenter/HRpQCTCore/slicer_bridge.py",
                       "HRpQCTRadiomics/HRpQCTRadiomicsLib/slicer_radiomics.py"}

GUI_MODULES = {"qt", "ctk", "PythonQt", "PyQt5", "PyQt6", "PySide2", "PySide6", "qSlicerBaseQTGUI",
               "SampleData", "DICOMLib"}
SLICER_CORE_MODULES = {"slicer", "vtk", "vtkmodules", "mrml", "MRMLCore"}
SLICER_APP_ATTRIBUTES = {"app", "modules", "moduleNames", "util", "ScriptedLoadableModule",
                         "parameterNodeWrapper", "qMRMLUtils", "packaging"}


def _engine_files(repo_root: Path) -> list[Path]:
    return sorted(p for package in ENGINE_PACKAGES for p in (repo_root / package).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _imports(tree: ast.AST):
    """Yield (top-level module name, full dotted name, node, inside-a-function)."""
    function_nodes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(node, function_nodes)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name.split(".")[0], alias.name, child, nested
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    yield (child.module.split(".")[0], f"{child.module}.{alias.name}", child,
                           nested)
            yield from visit(child, nested)

    yield from visit(tree, False)


def _classes(repo_root: Path, relative: str) -> dict[str, ast.ClassDef]:
    tree = ast.parse((repo_root / relative).read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _base_names(node: ast.ClassDef) -> list[str]:
    return [getattr(b, "id", getattr(b, "attr", "")) for b in node.bases]


def _methods(node: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    return {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}


def test_the_module_files_are_found():
    assert set(MODULE_FILES) < set(ALL_MODULE_FILES)
    assert "HRpQCTSegmenter/HRpQCTScancoImport.py" in ALL_MODULE_FILES


@pytest.mark.parametrize("relative", ALL_MODULE_FILES)
def test_module_file_compiles_without_slicer(repo_root, relative, tmp_path):
    py_compile.compile(str(repo_root / relative), cfile=str(tmp_path / "module.pyc"),
                       doraise=True)


@pytest.mark.parametrize("relative", ALL_MODULE_FILES)
def test_module_file_is_a_module_slicer_can_load(repo_root, relative):
    name = Path(relative).stem
    classes = _classes(repo_root, relative)
    # Slicer instantiates the class named like the file; a file without it fails to load.
    assert name in classes, f"{relative}: class {name} missing"
    assert "ScriptedLoadableModule" in _base_names(classes[name])
    assert f"{name}Test" in classes, f"{relative}: self-test class {name}Test missing"
    assert "ScriptedLoadableModuleTest" in _base_names(classes[f"{name}Test"])
    assert "runTest" in _methods(classes[f"{name}Test"])
    readers = [c for c in classes if c.endswith("FileReader")]
    for reader in readers:
        # qSlicerScriptedFileReader looks up exactly <module name>FileReader.
        assert reader == f"{name}FileReader", f"{relative}: Slicer never finds {reader}"
        missing = FILE_READER_METHODS - set(_methods(classes[reader]))
        assert not missing, f"{relative}: {reader} lacks {sorted(missing)}"
    source = (repo_root / relative).read_text(encoding="utf-8")
    if f"{name}Widget" not in classes:  # no panel: keep it out of the module list
        assert "self.parent.hidden = True" in source
    assert "not for clinical use" in source and "synthetic phantoms" in source
    cmake = (repo_root / Path(relative).parent / "CMakeLists.txt").read_text(encoding="utf-8")
    script = "${MODULE_NAME}.py" if name == Path(relative).parent.name else f"{name}.py"
    assert f"slicer_add_python_unittest(SCRIPT {script})" in cmake, (
        f"{relative}: its self-test is not registered as a CTest")


def test_scanco_files_are_read_by_a_hidden_reader_module(repo_root):
    classes = _classes(repo_root, "HRpQCTSegmenter/HRpQCTScancoImport.py")
    assert "HRpQCTScancoImportFileReader" in classes
    panel = _classes(repo_root, "HRpQCTSegmenter/HRpQCTSegmenter.py")
    assert not [c for c in panel if c.endswith("FileReader")], "one Scanco reader only"


@pytest.mark.parametrize("relative", MODULE_FILES)
def test_module_logic_calls_the_engine_functions(repo_root, relative):
    name = Path(relative).stem
    logic = _methods(_classes(repo_root, relative)[f"{name}Logic"])
    for method, function in LOGIC_CALLS[relative].items():
        assert method in logic, f"{name}Logic.{method} missing"
        body = ast.unparse(logic[method])
        assert f"{function}(" in body, f"{name}Logic.{method} does not call {function}"
    for method in logic.values():  # the scene comes from Slicer, never built here
        assert "vtkMRMLScene(" not in ast.unparse(method)


@pytest.mark.parametrize("relative", MODULE_FILES)
def test_module_file_defines_the_four_slicer_classes(repo_root, relative):
    name = Path(relative).stem
    classes = _classes(repo_root, relative)
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"),
                         ("Test", "ScriptedLoadableModuleTest")):
        assert f"{name}{suffix}" in classes, f"{relative}: class {name}{suffix} missing"
        bases = [getattr(b, "id", getattr(b, "attr", "")) for b in classes[f"{name}{suffix}"].bases]
        assert base in bases, f"{relative}: {name}{suffix} must derive from {base}"
    source = (repo_root / relative).read_text(encoding="utf-8")
    assert "not for clinical use" in source and "synthetic phantoms" in source


@pytest.mark.parametrize("relative", MODULE_FILES)
def test_module_ui_has_the_widgets_the_module_uses(repo_root, relative):
    module_dir = (repo_root / relative).parent
    name = Path(relative).stem
    ui_file = module_dir / "Resources" / "UI" / f"{name}.ui"
    widgets = {w.get("name"): w.get("class") for w in ET.parse(ui_file).iter("widget")}
    source = (repo_root / relative).read_text(encoding="utf-8")
    for used in sorted(set(re.findall(r"self\.ui\.(\w+)", source))):
        assert used in widgets, f"{relative} uses self.ui.{used}, which {ui_file.name} lacks"
    assert widgets["applyButton"] == "QPushButton"
    assert widgets["progressBar"] == "QProgressBar"
    assert widgets["statusLabel"] == "QLabel"
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"


def test_the_segmenter_keeps_each_result_for_improving_the_model(repo_root):
    """Every Logic run keeps the original result, and the "Improve the model" section is
    collapsed by default, with its own run panel for the fine-tuning."""
    relative = "HRpQCTSegmenter/HRpQCTSegmenter.py"
    logic = _methods(_classes(repo_root, relative)["HRpQCTSegmenterLogic"])
    for method in ("startSegmentation", "process"):
        assert "keep_original_in=self.originalResultsFolder()" in ast.unparse(logic[method])
    ui = ET.parse(repo_root / "HRpQCTSegmenter/Resources/UI/HRpQCTSegmenter.ui")
    widgets = {w.get("name"): w for w in ui.iter("widget")}
    section = widgets["improveCollapsibleButton"]
    assert section.get("class") == "ctkCollapsibleButton"
    props = {p.get("name"): p for p in section.findall("property")}
    assert props["collapsed"].findtext("bool") == "true"
    assert props["text"].findtext("string") == "Improve the model"
    inside = {w.get("name"): w.get("class") for w in section.iter("widget")}
    assert inside["trainingSetFolderPathLineEdit"] == "ctkPathLineEdit"
    assert inside["addToTrainingSetButton"] == inside["fineTuneButton"] == "QPushButton"
    assert inside["fineTuneProgressBar"] == "QProgressBar"
    widget = ast.unparse(_classes(repo_root, relative)["HRpQCTSegmenterWidget"])
    assert widget.count("RunPanel(") == 2 and "_fineTunePanel.poll" in widget
    assert "FINE_TUNING_DEPENDENCIES" in widget  # PyTorch offered before fine-tuning


def test_engine_packages_import_no_gui_and_no_slicer_at_module_level(repo_root):
    problems = []
    for path in _engine_files(repo_root):
        relative = path.relative_to(repo_root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        for top, full, node, in_function in _imports(tree):
            where = f"{relative}:{node.lineno}"
            if top in GUI_MODULES:
                problems.append(f"{where} imports GUI module {full}")
            elif top in SLICER_CORE_MODULES:
                if relative not in SLICER_CORE_BRIDGES:
                    problems.append(f"{where} imports {full}; only the Slicer bridge may")
                elif not in_function:
                    problems.append(f"{where} imports {full} at module level; import it inside "
                                    "the function so the engine imports without Slicer")
                if top == "slicer" and full.split(".")[1:2] and (
                        full.split(".")[1] in SLICER_APP_ATTRIBUTES):
                    problems.append(f"{where} imports Slicer's application layer ({full})")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "slicer" and node.attr in SLICER_APP_ATTRIBUTES):
                problems.append(f"{relative}:{node.lineno} uses slicer.{node.attr} "
                                "(application layer, absent outside the Slicer GUI)")
    assert not problems, "\n".join(problems)


def test_engine_imports_without_slicer_or_qt(repo_root):
    # A fresh interpreter with slicer/qt imports blocked must still import every engine module.
    modules = []
    for path in _engine_files(repo_root):
        package_root = next(p for p in path.parents if p.name in ("HRpQCTSegmenter",
                                                                 "HRpQCTRadiomics"))
        dotted = path.relative_to(package_root).with_suffix("").as_posix().replace("/", ".")
        modules.append(dotted.removesuffix(".__init__"))
    script = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('slicer', 'qt', 'ctk', 'vtk'):\n"
        "            raise ImportError('blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {sorted(m for m in modules if not m.endswith('__main__'))!r}:\n"
        "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("relative", ALL_MODULE_FILES)
def test_module_help_names_the_oldest_slicer_and_the_bundled_classifier(repo_root, relative):
    # Slicer 5.8 ships Python 3.9, which the engine does not support.
    source = (repo_root / relative).read_text(encoding="utf-8")
    help_text = next(ast.unparse(node.value) for node in ast.walk(ast.parse(source))
                     if isinstance(node, ast.Assign)
                     and ast.unparse(node.targets[0]) == "self.parent.helpText")
    assert "Slicer 5.10 or newer" in help_text
    if Path(relative).stem in ("HRpQCTSegmenter", "HRpQCTRadiomics"):
        assert "osteoporosis-classifier" in help_text


@pytest.mark.parametrize("relative", [*ALL_MODULE_FILES,
                                      "HRpQCTSegmenter/Resources/UI/HRpQCTSegmenter.ui",
                                      "HRpQCTRadiomics/Resources/UI/HRpQCTRadiomics.ui"])
def test_no_text_says_no_classifier_is_bundled(repo_root, relative):
    text = (repo_root / relative).read_text(encoding="utf-8").lower()
    assert "none is bundled" not in text and "no classifier is bundled" not in text


@pytest.mark.parametrize("relative", ALL_MODULE_FILES)
def test_self_tests_never_install_packages(repo_root, relative):
    """A self-test on a test machine skips (with a message) what needs absent packages."""
    name = Path(relative).stem
    test_class = _classes(repo_root, relative)[f"{name}Test"]
    body = ast.unparse(test_class)
    for installer in ("ensureDependencies(", "ensure_dependencies(", "pip_install(",
                      "pip_ensure(", "installTorch("):
        assert installer not in body, f"{name}Test installs packages ({installer})"
    if "DEPENDENCIES" in body:  # it needs optional packages: it checks for them first
        assert "missing_dependencies(" in body and "delayDisplay(" in body


@pytest.mark.parametrize("relative", MODULE_FILES)
def test_both_widgets_run_through_the_shared_run_panel(repo_root, relative):
    name = Path(relative).stem
    widget = _classes(repo_root, relative)[f"{name}Widget"]
    body = ast.unparse(widget)
    assert "RunPanel(" in body and "PanelView(" in body
    assert "_panel.poll" in body  # the widget's QTimer ticks the shared panel
    # the polling, status and error flow is the panel's, not repeated in each widget
    assert "onPoll" not in _methods(widget) and "JobState" not in body


def _module_dependencies(repo_root: Path, relative: str) -> list[str]:
    tree = ast.parse((repo_root / relative).read_text(encoding="utf-8"))
    return next(ast.literal_eval(node.value) for node in ast.walk(tree)
                if isinstance(node, ast.Assign)
                and ast.unparse(node.targets[0]) == "self.parent.dependencies")


def test_the_radiomics_module_loads_after_the_segmenter(repo_root):
    """HRpQCTCore lives in the Segmenter's folder: Slicer must load that module first."""
    assert "HRpQCTSegmenter" in _module_dependencies(repo_root,
                                                     "HRpQCTRadiomics/HRpQCTRadiomics.py")


@pytest.mark.parametrize("relative", MODULE_FILES)
def test_apply_offers_the_dependencies_before_starting(repo_root, relative):
    """Each module's first Apply offers what its run imports (its own declaration)."""
    name = Path(relative).stem
    start = _methods(_classes(repo_root, relative)[f"{name}Widget"])["startRun"]
    body = ast.unparse(start)
    assert "ensureDependencies(" in body
    assert body.index("ensureDependencies(") < body.index(".startRun(" if "Radiomics" in name
                                                          else ".startSegmentation(")
    source = (repo_root / relative).read_text(encoding="utf-8")
    declaration = ("RADIOMICS_DEPENDENCIES" if "Radiomics" in name
                   else "segmenter_dependencies")
    assert declaration in source and "pip_install" in source
    assert "slicer.util.pip_install" not in source  # pip only with Slicer's packages pinned
