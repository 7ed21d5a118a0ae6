// Command kstatus-check judges Kubernetes objects the way platform tooling does, with the real
// libraries rather than a re-implementation:
//
//   - "kstatus": sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute, the kstatus library that
//     kpt, kapp-style waiters and `kubectl wait`-like tooling use.
//   - "flux": what Flux's kustomize-controller computes during its health check. For an object
//     whose GroupKind has a spec.healthCheckExprs entry this is github.com/fluxcd/pkg/runtime/cel
//     NewStatusReader(...) -> StatusReader.ReadStatusForObject, i.e. the CEL StatusEvaluator
//     (observedGeneration gate, then inProgress, failed, current, else InProgress) wrapped in
//     Flux's generic status reader. Without a matching entry Flux falls back to its default
//     status readers; for a custom resource that is the generic reader around Flux's kstatus fork
//     (github.com/fluxcd/cli-utils status.Compute), which is what is used here. (For built-in
//     workloads such as Deployments Flux's poller also looks at generated ReplicaSets/Pods; that
//     needs a cluster and is not modelled.)
//
// Input (stdin), one JSON document:
//
//	{"healthCheckExprs": [{"apiVersion": "...", "kind": "...", "current": "...", "inProgress": "...", "failed": "..."}],
//	 "objects": [ <unstructured objects> ]}
//
// Output (stdout), one JSON array with one entry per object:
//
//	{"kstatus": {"status": "...", "message": "..."}, "flux": {"status": "...", "message": "..."}}
//
// When Flux's reader attaches an error to the result (a CEL expression failed to evaluate, e.g.
// it references a field the object lacks) Flux's poller reports the object as Unknown with that
// error, and kustomize-controller keeps waiting until its timeout, then says
// "<object> status: 'Unknown': <error>". This tool reports such results as status "Error" with the
// error as message, so tests can tell them from a plain Unknown. Invalid healthCheckExprs (Flux
// refuses the whole Kustomization) make every object's flux verdict "Error".
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/fluxcd/cli-utils/pkg/kstatus/polling/engine"
	fluxstatusreaders "github.com/fluxcd/cli-utils/pkg/kstatus/polling/statusreaders"
	fluxstatus "github.com/fluxcd/cli-utils/pkg/kstatus/status"
	"github.com/fluxcd/pkg/apis/kustomize"
	fluxcel "github.com/fluxcd/pkg/runtime/cel"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type healthCheckExpr struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Current    string `json:"current"`
	InProgress string `json:"inProgress"`
	Failed     string `json:"failed"`
}

type input struct {
	HealthCheckExprs []healthCheckExpr `json:"healthCheckExprs"`
	Objects          []json.RawMessage `json:"objects"`
}

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type judgement struct {
	Kstatus verdict `json:"kstatus"`
	Flux    verdict `json:"flux"`
}

func errVerdict(err error) verdict { return verdict{Status: "Error", Message: err.Error()} }

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus-check:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	raw, err := io.ReadAll(in)
	if err != nil {
		return fmt.Errorf("reading stdin: %w", err)
	}
	var req input
	if err := json.Unmarshal(raw, &req); err != nil {
		return fmt.Errorf("parsing input: %w", err)
	}

	checks := make([]kustomize.CustomHealthCheck, 0, len(req.HealthCheckExprs))
	for _, h := range req.HealthCheckExprs {
		checks = append(checks, kustomize.CustomHealthCheck{
			APIVersion: h.APIVersion,
			Kind:       h.Kind,
			HealthCheckExpressions: kustomize.HealthCheckExpressions{
				Current:    h.Current,
				InProgress: h.InProgress,
				Failed:     h.Failed,
			},
		})
	}
	// The same constructor kustomize-controller calls with spec.healthCheckExprs; the mapper is
	// only used to look objects up in a cluster, which ReadStatusForObject does not do.
	var celReader *fluxcel.StatusReader
	newReader, readerErr := fluxcel.NewStatusReader(checks)
	if readerErr == nil {
		celReader = newReader(nil).(*fluxcel.StatusReader)
	}
	defaultReader := fluxstatusreaders.NewGenericStatusReader(nil, fluxstatus.Compute)

	ctx := context.Background()
	results := make([]judgement, 0, len(req.Objects))
	for i, obj := range req.Objects {
		// k8s.io/apimachinery's JSON decoding (as the API client does): integers become int64,
		// so metadata.generation / status.observedGeneration compare as they do in a controller.
		var m map[string]any
		if err := utiljson.Unmarshal(obj, &m); err != nil {
			return fmt.Errorf("objects[%d]: %w", i, err)
		}
		if m == nil {
			return fmt.Errorf("objects[%d]: not a JSON object", i)
		}
		results = append(results, judgement{
			Kstatus: judgeKstatus(&unstructured.Unstructured{Object: m}),
			Flux:    judgeFlux(ctx, celReader, readerErr, defaultReader, &unstructured.Unstructured{Object: deepCopy(m)}),
		})
	}

	enc := json.NewEncoder(out)
	return enc.Encode(results)
}

func deepCopy(m map[string]any) map[string]any {
	return runtimeDeepCopy(m).(map[string]any)
}

func runtimeDeepCopy(v any) any {
	switch t := v.(type) {
	case map[string]any:
		c := make(map[string]any, len(t))
		for k, x := range t {
			c[k] = runtimeDeepCopy(x)
		}
		return c
	case []any:
		c := make([]any, len(t))
		for i, x := range t {
			c[i] = runtimeDeepCopy(x)
		}
		return c
	default:
		return v
	}
}

func judgeKstatus(u *unstructured.Unstructured) verdict {
	res, err := status.Compute(u)
	if err != nil {
		return errVerdict(err)
	}
	return verdict{Status: res.Status.String(), Message: res.Message}
}

func judgeFlux(ctx context.Context, celReader *fluxcel.StatusReader, readerErr error,
	defaultReader engine.StatusReader, u *unstructured.Unstructured) verdict {
	if readerErr != nil {
		return errVerdict(readerErr)
	}
	// Flux's poller asks its custom readers first and uses the first that supports the GroupKind.
	var reader engine.StatusReader = defaultReader
	if celReader.Supports(u.GroupVersionKind().GroupKind()) {
		reader = celReader
	}
	rs, err := reader.ReadStatusForObject(ctx, nil, u)
	if err != nil {
		return errVerdict(err)
	}
	if rs.Error != nil {
		return errVerdict(rs.Error)
	}
	return verdict{Status: rs.Status.String(), Message: rs.Message}
}
