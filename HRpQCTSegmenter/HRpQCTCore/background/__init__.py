"""Running engine work in a background process for the Slicer modules, without Qt."""
