"""camserve's own JSON API: /predict, /gradcam, /health, probes, metrics and the web page."""
