"""transformers / peft / trl glue. Import the submodules directly; they load their dependencies lazily."""
