package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

	"sigs.k8s.io/yaml"
)

// The one place output formats live: every command that prints a result
// calls printResult, and -o picks the format.
const outputHelp = "output format: table, wide (a table with more columns), json or yaml"

// checkOutput refuses an unknown -o before a command does anything: a
// command that changes state and then cannot print its result would exit
// non-zero with the change made.
func checkOutput(format string) error {
	switch format {
	case "table", "wide", "json", "yaml", "":
		return nil
	}
	return fmt.Errorf("--output %q: want table, wide, json or yaml", format)
}

// printResult writes v as JSON or YAML, or calls table for the default,
// human format.
func printResult(w io.Writer, format string, v any, table func(*tabwriter.Writer)) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		// Through JSON, so the field names are the API's json tags.
		b, err := yaml.Marshal(v)
		if err != nil {
			return fmt.Errorf("encode yaml: %w", err)
		}
		_, err = w.Write(b)
		return err
	case "table", "wide", "":
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		table(tw)
		return tw.Flush()
	}
	return checkOutput(format)
}
