"""Runners turn loaded weights plus job parameters into image bytes."""
