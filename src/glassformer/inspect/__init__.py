"""Seeing inside a model: the cell-by-cell trace and worked examples (trace, examples), attention
pictures (attention), the Mermaid diagram (diagram), head detectors (heads), activation patching
(patching) and its gradient estimate (attribution_patching), direct logit attribution (attribution),
the logit lens (lens), TransformerLens weight processing (processing), composition scores of the
QK/OV circuits (circuits), the self-contained HTML page (html) and their CLI commands (commands).
Each takes token ids or text (inputs: the tokens and the token strings that label the output)."""
