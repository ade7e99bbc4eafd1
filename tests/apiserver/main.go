// Command lb-test-apiserver is a small Kubernetes API server for lb's integration tests,
// built on k8s.io/apiserver's generic server (see README.md beside this file).
//
// It serves core/v1 namespaces, services, endpoints, nodes and pods and discovery.k8s.io/v1
// endpointslices from etcd (genericregistry.Store with the watch cache, so list, watch,
// bookmarks, label selectors, streaming lists and server-side apply behave like
// kube-apiserver's), and delegates everything else to the apiextensions apiserver, so
// CustomResourceDefinitions and their custom resources work. Authentication is one static
// bearer token, every request is allowed, the serving certificate is self-signed.
//
// What a real cluster has and this server lacks: defaulting, validation, ClusterIP
// allocation, admission (an object may be created in a namespace that does not exist), RBAC,
// garbage collection and controllers. Writing the main resource of an object writes its
// status too (a real server ignores status there); the /status subresources write only the
// status, like a real one. Deleting a namespace deletes what is in it at once.
package main

import (
	"context"
	goflag "flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"reflect"
	"sort"
	"strconv"
	"time"

	restful "github.com/emicklei/go-restful/v3"
	"github.com/spf13/pflag"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsv1beta1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1beta1"
	apiextensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apiextensionsinformers "k8s.io/apiextensions-apiserver/pkg/client/informers/externalversions"
	apiextensionsoptions "k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	apiextensionsopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metainternalversion "k8s.io/apimachinery/pkg/apis/meta/internalversion"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/conversion"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/authentication/authenticatorfactory"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	discoveryaggregated "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapirequest "k8s.io/apiserver/pkg/endpoints/request"
	genericregistry "k8s.io/apiserver/pkg/registry/generic"
	genericstore "k8s.io/apiserver/pkg/registry/generic/registry"
	"k8s.io/apiserver/pkg/registry/rest"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/server/healthz"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/storage/names"
	"k8s.io/apiserver/pkg/storage/storagebackend"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/dynamic"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	restclient "k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/kube-openapi/pkg/builder3"
	"k8s.io/kube-openapi/pkg/common/restfuladapter"
	"k8s.io/kube-openapi/pkg/validation/spec"
	netutils "k8s.io/utils/net"

	generatedopenapi "lb-test-apiserver/openapi"
)

// etcdPrefix is kube-apiserver's: objects live under /registry/<group>/<resource>/...
const etcdPrefix = "/registry"

// kind is one built-in resource this server stores.
type kind struct {
	gv         schema.GroupVersion
	resource   string
	singular   string
	namespaced bool
	// generation: metadata.generation is 1 on create and grows by one with every change
	// outside metadata and status, as kube-apiserver does for these kinds.
	generation bool
	// status: the kind has a status and a /status subresource.
	status     bool
	shortNames []string
	categories []string
	newObj     func() runtime.Object
	newList    func() runtime.Object
}

var kinds = []*kind{
	{gv: corev1.SchemeGroupVersion, resource: "namespaces", singular: "namespace", status: true,
		shortNames: []string{"ns"},
		newObj:     func() runtime.Object { return &corev1.Namespace{} },
		newList:    func() runtime.Object { return &corev1.NamespaceList{} }},
	{gv: corev1.SchemeGroupVersion, resource: "services", singular: "service", namespaced: true, status: true,
		shortNames: []string{"svc"}, categories: []string{"all"},
		newObj:  func() runtime.Object { return &corev1.Service{} },
		newList: func() runtime.Object { return &corev1.ServiceList{} }},
	{gv: corev1.SchemeGroupVersion, resource: "endpoints", singular: "endpoints", namespaced: true,
		shortNames: []string{"ep"},
		newObj:     func() runtime.Object { return &corev1.Endpoints{} },
		newList:    func() runtime.Object { return &corev1.EndpointsList{} }},
	{gv: corev1.SchemeGroupVersion, resource: "nodes", singular: "node", status: true,
		shortNames: []string{"no"},
		newObj:     func() runtime.Object { return &corev1.Node{} },
		newList:    func() runtime.Object { return &corev1.NodeList{} }},
	{gv: corev1.SchemeGroupVersion, resource: "pods", singular: "pod", namespaced: true, generation: true, status: true,
		shortNames: []string{"po"}, categories: []string{"all"},
		newObj:  func() runtime.Object { return &corev1.Pod{} },
		newList: func() runtime.Object { return &corev1.PodList{} }},
	{gv: discoveryv1.SchemeGroupVersion, resource: "endpointslices", singular: "endpointslice", namespaced: true, generation: true,
		newObj:  func() runtime.Object { return &discoveryv1.EndpointSlice{} },
		newList: func() runtime.Object { return &discoveryv1.EndpointSliceList{} }},
}

var (
	scheme = runtime.NewScheme()
	codecs = serializer.NewCodecFactory(scheme)
)

// The storage works on "internal" objects and converts them to the served version. There
// are no internal Go types outside kubernetes/kubernetes, so the v1 types are registered as
// the internal version too, with identity conversions.
func init() {
	utilruntime.Must(corev1.AddToScheme(scheme))
	utilruntime.Must(discoveryv1.AddToScheme(scheme))
	utilruntime.Must(scheme.SetVersionPriority(corev1.SchemeGroupVersion))
	utilruntime.Must(scheme.SetVersionPriority(discoveryv1.SchemeGroupVersion))
	for _, k := range kinds {
		internal := schema.GroupVersion{Group: k.gv.Group, Version: runtime.APIVersionInternal}
		for _, obj := range []runtime.Object{k.newObj(), k.newList()} {
			scheme.AddKnownTypes(internal, obj)
			utilruntime.Must(scheme.AddConversionFunc(obj, obj, func(in, out interface{}, _ conversion.Scope) error {
				reflect.ValueOf(out).Elem().Set(reflect.ValueOf(in).Elem())
				return nil
			}))
		}
	}
	unversioned := schema.GroupVersion{Group: "", Version: "v1"}
	metav1.AddToGroupVersion(scheme, unversioned)
	scheme.AddUnversionedTypes(unversioned,
		&metav1.Status{}, &metav1.APIVersions{}, &metav1.APIGroupList{}, &metav1.APIGroup{}, &metav1.APIResourceList{})
}

func main() {
	var (
		etcdServers []string
		bindAddress = "127.0.0.1"
		securePort  = 6443
		token       string
		certDir     string
	)
	fs := pflag.NewFlagSet("lb-test-apiserver", pflag.ExitOnError)
	fs.StringSliceVar(&etcdServers, "etcd-servers", nil, "etcd client URLs, e.g. http://127.0.0.1:2379")
	fs.StringVar(&bindAddress, "bind-address", bindAddress, "the IP address to serve HTTPS on")
	fs.IntVar(&securePort, "secure-port", securePort, "the port to serve HTTPS on")
	fs.StringVar(&token, "token", "", "the static bearer token of the (only) user, an admin")
	fs.StringVar(&certDir, "cert-dir", "", "where the self-signed serving certificate goes (apiserver.crt, apiserver.key)")
	klogFlags := goflag.NewFlagSet("klog", goflag.ExitOnError)
	klog.InitFlags(klogFlags)
	fs.AddGoFlagSet(klogFlags)
	utilruntime.Must(fs.Parse(os.Args[1:]))
	if len(etcdServers) == 0 || token == "" || certDir == "" {
		fmt.Fprintln(os.Stderr, "lb-test-apiserver: --etcd-servers, --token and --cert-dir are required")
		os.Exit(2)
	}
	if err := run(etcdServers, bindAddress, securePort, token, certDir); err != nil {
		fmt.Fprintf(os.Stderr, "lb-test-apiserver: %v\n", err)
		os.Exit(1)
	}
}

func run(etcdServers []string, bindAddress string, securePort int, token, certDir string) error {
	ctx := genericapiserver.SetupSignalContext()

	// Serving, loopback client, authentication and authorization are shared by the two
	// servers of the chain (core, then apiextensions), as in kube-apiserver.
	serving := genericoptions.NewSecureServingOptions().WithLoopback()
	serving.BindAddress = netutils.ParseIPSloppy(bindAddress)
	if serving.BindAddress == nil {
		return fmt.Errorf("--bind-address %q is not an IP address", bindAddress)
	}
	serving.BindPort = securePort
	serving.ServerCert.CertDirectory = certDir
	if err := serving.MaybeDefaultWithSelfSignedCerts("localhost", nil, []net.IP{serving.BindAddress}); err != nil {
		return fmt.Errorf("creating the self-signed certificate: %w", err)
	}

	coreConfig := genericapiserver.NewRecommendedConfig(codecs)
	if err := genericoptions.NewServerRunOptions().ApplyTo(&coreConfig.Config); err != nil {
		return err
	}
	if err := serving.ApplyTo(&coreConfig.SecureServing, &coreConfig.LoopbackClientConfig); err != nil {
		return err
	}
	admin := &user.DefaultInfo{Name: "lb-test-admin", Groups: []string{user.SystemPrivilegedGroup, user.AllAuthenticated}}
	coreConfig.Authentication.Authenticator = authenticatorfactory.NewFromTokens(map[string]*user.DefaultInfo{token: admin}, nil)
	allow := authorizerfactory.NewAlwaysAllowAuthorizer()
	coreConfig.Authorization.Authorizer = allow
	coreConfig.RuleResolver = allow
	// One aggregated discovery document (/apis) for both servers.
	coreConfig.AggregatedDiscoveryGroupManager = discoveryaggregated.NewResourceManager("apis")
	namer := openapinamer.NewDefinitionNamer(scheme, apiextensionsapiserver.Scheme, clientgoscheme.Scheme)
	coreConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(
		openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions), namer)
	coreConfig.OpenAPIV3Config.Info.Title = "lb-test-apiserver"
	coreConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(
		openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions), namer)
	coreConfig.OpenAPIConfig.Info.Title = "lb-test-apiserver"
	coreConfig.ExternalAddress = net.JoinHostPort(bindAddress, strconv.Itoa(securePort))

	// The apiextensions server: the same settings with its own codec, storage and OpenAPI.
	extConfig := &genericapiserver.RecommendedConfig{Config: coreConfig.Config}
	extConfig.Serializer = apiextensionsapiserver.Codecs
	extConfig.MergedResourceConfig = apiextensionsapiserver.DefaultAPIResourceConfigSource()
	extConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(
		openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(apiextensionsopenapi.GetOpenAPIDefinitions), namer)
	extConfig.OpenAPIV3Config.Info.Title = "lb-test-apiserver"
	extConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(
		openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(apiextensionsopenapi.GetOpenAPIDefinitions), namer)
	extConfig.OpenAPIConfig.Info.Title = "lb-test-apiserver"
	// The copy must not share the original's hook map and check lists.
	extConfig.PostStartHooks = map[string]genericapiserver.PostStartHookConfigEntry{}
	extConfig.HealthzChecks = append([]healthz.HealthChecker(nil), coreConfig.HealthzChecks...)
	extConfig.ReadyzChecks = append([]healthz.HealthChecker(nil), coreConfig.ReadyzChecks...)
	extConfig.LivezChecks = append([]healthz.HealthChecker(nil), coreConfig.LivezChecks...)

	coreEtcd := etcdOptions(etcdServers, codecs.LegacyCodec(corev1.SchemeGroupVersion, discoveryv1.SchemeGroupVersion))
	if err := coreEtcd.ApplyTo(&coreConfig.Config); err != nil {
		return err
	}
	extEtcd := etcdOptions(etcdServers, apiextensionsapiserver.Codecs.LegacyCodec(apiextensionsv1beta1.SchemeGroupVersion, apiextensionsv1.SchemeGroupVersion))
	extEtcd.SkipHealthEndpoints = true // the core server checks the same etcd
	if err := extEtcd.ApplyTo(&extConfig.Config); err != nil {
		return err
	}

	ext := &apiextensionsapiserver.Config{
		GenericConfig: extConfig,
		ExtraConfig: apiextensionsapiserver.ExtraConfig{
			CRDRESTOptionsGetter: apiextensionsoptions.NewCRDRESTOptionsGetter(*extEtcd, extConfig.ResourceTransformers, extConfig.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, extConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	extServer, err := ext.Complete().New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return fmt.Errorf("creating the apiextensions server: %w", err)
	}

	server, err := coreConfig.Complete().New("lb-test-apiserver", extServer.GenericAPIServer)
	if err != nil {
		return fmt.Errorf("creating the server: %w", err)
	}
	if err := installCoreAPIs(server, coreConfig.RESTOptionsGetter); err != nil {
		return err
	}

	// Without kube-aggregator nobody lists the apiextensions group and the CRDs' groups in
	// the plain /apis (APIGroupList); the aggregated form is shared above.
	server.DiscoveryGroupManager.AddGroup(apiGroup(apiextensionsv1.GroupName, []string{"v1"}))
	server.AddPostStartHookOrDie("lb-crd-groups-in-discovery", func(hook genericapiserver.PostStartHookContext) error {
		return listCRDGroups(hook, server)
	})
	server.AddPostStartHookOrDie("lb-system-namespaces", createSystemNamespaces)

	prepared := server.PrepareRun()
	// One set of OpenAPI documents for both servers: the outer server's are served, so the
	// apiextensions group and the CRDs (whose controllers start after this) go into them.
	extGeneric := extServer.GenericAPIServer
	v2 := *server.StaticOpenAPISpec
	v2.Paths = &spec.Paths{Paths: map[string]spec.PathItem{}}
	v2.Definitions = spec.Definitions{}
	for _, part := range []*spec.Swagger{server.StaticOpenAPISpec, extGeneric.StaticOpenAPISpec} {
		for path, item := range part.Paths.Paths {
			v2.Paths.Paths[path] = item
		}
		for name, schema := range part.Definitions {
			v2.Definitions[name] = schema
		}
	}
	extGeneric.StaticOpenAPISpec = &v2
	extGeneric.OpenAPIVersionedService = server.OpenAPIVersionedService
	for _, ws := range extGeneric.Handler.GoRestfulContainer.RegisteredWebServices() {
		doc, err := builder3.BuildOpenAPISpecFromRoutes(restfuladapter.AdaptWebServices([]*restful.WebService{ws}), extConfig.OpenAPIV3Config)
		if err != nil {
			return fmt.Errorf("OpenAPI v3 of %s: %w", ws.RootPath(), err)
		}
		server.OpenAPIV3VersionedService.UpdateGroupVersion(ws.RootPath()[1:], doc)
	}
	extGeneric.OpenAPIV3VersionedService = server.OpenAPIV3VersionedService
	return prepared.RunWithContext(ctx)
}

func etcdOptions(servers []string, codec runtime.Codec) *genericoptions.EtcdOptions {
	options := genericoptions.NewEtcdOptions(storagebackend.NewDefaultConfig(etcdPrefix, codec))
	options.StorageConfig.Transport.ServerList = servers
	// No garbage collector runs: a deletion must not wait for one (orphan/foreground
	// finalizers would stay forever).
	options.EnableGarbageCollection = false
	return options
}

// installCoreAPIs installs the built-in kinds: /api/v1 and /apis/discovery.k8s.io/v1.
func installCoreAPIs(server *genericapiserver.GenericAPIServer, optsGetter genericregistry.RESTOptionsGetter) error {
	groups := map[string]*genericapiserver.APIGroupInfo{}
	var namespaced []*genericstore.Store
	var namespaces *namespaceREST
	for _, k := range kinds {
		info := groups[k.gv.Group]
		if info == nil {
			i := genericapiserver.NewDefaultAPIGroupInfo(k.gv.Group, scheme, metav1.ParameterCodec, codecs)
			i.PrioritizedVersions = []schema.GroupVersion{k.gv}
			i.VersionedResourcesStorageMap[k.gv.Version] = map[string]rest.Storage{}
			info = &i
			groups[k.gv.Group] = info
		}
		storage := info.VersionedResourcesStorageMap[k.gv.Version]

		store := &genericstore.Store{
			NewFunc:                   k.newObj,
			NewListFunc:               k.newList,
			DefaultQualifiedResource:  k.gv.WithResource(k.resource).GroupResource(),
			SingularQualifiedResource: k.gv.WithResource(k.singular).GroupResource(),
			CreateStrategy:            strategy{k},
			UpdateStrategy:            strategy{k},
			DeleteStrategy:            strategy{k},
			TableConvertor:            rest.NewDefaultTableConvertor(k.gv.WithResource(k.resource).GroupResource()),
		}
		if err := store.CompleteWithOptions(&genericregistry.StoreOptions{RESTOptions: optsGetter}); err != nil {
			return fmt.Errorf("storage for %s: %w", k.resource, err)
		}
		main := &resourceREST{Store: store, kind: k}
		storage[k.resource] = main
		if k.resource == "namespaces" {
			namespaces = &namespaceREST{resourceREST: main}
			storage[k.resource] = namespaces
		}
		if k.namespaced {
			namespaced = append(namespaced, store)
		}
		if k.status {
			statusStore := *store
			statusStore.UpdateStrategy = statusStrategy{strategy{k}}
			statusStore.CreateStrategy = nil
			storage[k.resource+"/status"] = &statusREST{store: &statusStore}
		}
	}
	namespaces.contents = namespaced
	namespaces.loopback = server.LoopbackClientConfig

	if err := server.InstallLegacyAPIGroup(genericapiserver.DefaultLegacyAPIPrefix, groups[""]); err != nil {
		return fmt.Errorf("installing /api/v1: %w", err)
	}
	if err := server.InstallAPIGroup(groups[discoveryv1.GroupName]); err != nil {
		return fmt.Errorf("installing %s: %w", discoveryv1.SchemeGroupVersion, err)
	}
	return nil
}

// strategy is the create/update/delete behaviour of every built-in kind: no defaulting, no
// validation; only what the storage layer itself does (uid, creationTimestamp,
// resourceVersion) plus generation.
type strategy struct{ k *kind }

var _ rest.RESTCreateStrategy = strategy{}
var _ rest.RESTUpdateStrategy = strategy{}
var _ rest.RESTDeleteStrategy = strategy{}

func (s strategy) ObjectKinds(obj runtime.Object) ([]schema.GroupVersionKind, bool, error) {
	return scheme.ObjectKinds(obj)
}
func (s strategy) Recognizes(gvk schema.GroupVersionKind) bool { return scheme.Recognizes(gvk) }
func (s strategy) GenerateName(base string) string {
	return names.SimpleNameGenerator.GenerateName(base)
}
func (s strategy) NamespaceScoped() bool          { return s.k.namespaced }
func (s strategy) AllowCreateOnUpdate() bool      { return false }
func (s strategy) AllowUnconditionalUpdate() bool { return true }
func (s strategy) Canonicalize(runtime.Object)    {}
func (s strategy) Validate(context.Context, runtime.Object) field.ErrorList {
	return nil
}
func (s strategy) ValidateUpdate(context.Context, runtime.Object, runtime.Object) field.ErrorList {
	return nil
}
func (s strategy) WarningsOnCreate(context.Context, runtime.Object) []string { return nil }
func (s strategy) WarningsOnUpdate(context.Context, runtime.Object, runtime.Object) []string {
	return nil
}

func (s strategy) PrepareForCreate(_ context.Context, obj runtime.Object) {
	m, err := meta.Accessor(obj)
	if err != nil {
		return
	}
	if s.k.generation {
		m.SetGeneration(1)
	} else {
		m.SetGeneration(0)
	}
	if ns, ok := obj.(*corev1.Namespace); ok {
		if ns.Status.Phase == "" {
			ns.Status.Phase = corev1.NamespaceActive
		}
		labelNamespace(ns)
	}
}

// labelNamespace sets kubernetes.io/metadata.name, which kube-apiserver puts on every
// namespace (so selectors can pick namespaces by name).
func labelNamespace(ns *corev1.Namespace) {
	if ns.Labels == nil {
		ns.Labels = map[string]string{}
	}
	ns.Labels[corev1.LabelMetadataName] = ns.Name
}

func (s strategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	m, err1 := meta.Accessor(obj)
	oldMeta, err2 := meta.Accessor(old)
	if err1 != nil || err2 != nil {
		return
	}
	generation := oldMeta.GetGeneration()
	if s.k.generation && !equality.Semantic.DeepEqual(withoutMetaAndStatus(obj), withoutMetaAndStatus(old)) {
		generation++
	}
	m.SetGeneration(generation)
	if ns, ok := obj.(*corev1.Namespace); ok {
		labelNamespace(ns)
	}
}

// withoutMetaAndStatus is a copy of obj with ObjectMeta and Status zeroed: what a change
// of generation looks at.
func withoutMetaAndStatus(obj runtime.Object) runtime.Object {
	c := obj.DeepCopyObject()
	v := reflect.ValueOf(c).Elem()
	for _, name := range []string{"ObjectMeta", "Status"} {
		if f := v.FieldByName(name); f.IsValid() && f.CanSet() {
			f.Set(reflect.Zero(f.Type()))
		}
	}
	return c
}

// statusStrategy is the /status subresource's update: only the status (and the
// resourceVersion, for the precondition) of the new object is kept.
type statusStrategy struct{ strategy }

func (s statusStrategy) PrepareForUpdate(_ context.Context, obj, old runtime.Object) {
	newValue := reflect.ValueOf(obj).Elem()
	status := reflect.New(newValue.FieldByName("Status").Type()).Elem()
	status.Set(newValue.FieldByName("Status"))
	m, err := meta.Accessor(obj)
	if err != nil {
		return
	}
	resourceVersion := m.GetResourceVersion()
	newValue.Set(reflect.ValueOf(old.DeepCopyObject()).Elem())
	newValue.FieldByName("Status").Set(status)
	m.SetResourceVersion(resourceVersion)
}

// resourceREST is a kind's main resource: the store plus short names and categories.
type resourceREST struct {
	*genericstore.Store
	kind *kind
}

func (r *resourceREST) ShortNames() []string { return r.kind.shortNames }
func (r *resourceREST) Categories() []string { return r.kind.categories }

// statusREST serves <resource>/status.
type statusREST struct {
	store *genericstore.Store
}

func (r *statusREST) New() runtime.Object { return r.store.New() }
func (r *statusREST) Destroy()            {}
func (r *statusREST) Get(ctx context.Context, name string, options *metav1.GetOptions) (runtime.Object, error) {
	return r.store.Get(ctx, name, options)
}
func (r *statusREST) Update(ctx context.Context, name string, objInfo rest.UpdatedObjectInfo, createValidation rest.ValidateObjectFunc, updateValidation rest.ValidateObjectUpdateFunc, _ bool, options *metav1.UpdateOptions) (runtime.Object, bool, error) {
	// A status write never creates the object.
	return r.store.Update(ctx, name, objInfo, createValidation, updateValidation, false, options)
}
func (r *statusREST) ConvertToTable(ctx context.Context, object runtime.Object, tableOptions runtime.Object) (*metav1.Table, error) {
	return r.store.ConvertToTable(ctx, object, tableOptions)
}

// namespaceREST deletes what a namespace holds, built-in and custom resources, before the
// namespace itself (kube-apiserver's namespace controller does this after the namespace
// turns Terminating; here it happens within the DELETE).
type namespaceREST struct {
	*resourceREST
	contents []*genericstore.Store
	loopback *restclient.Config
}

func (r *namespaceREST) Delete(ctx context.Context, name string, deleteValidation rest.ValidateObjectFunc, options *metav1.DeleteOptions) (runtime.Object, bool, error) {
	if _, err := r.Get(ctx, name, &metav1.GetOptions{}); err != nil {
		return nil, false, err
	}
	inNamespace := genericapirequest.WithNamespace(ctx, name)
	for _, store := range r.contents {
		if _, err := store.DeleteCollection(inNamespace, rest.ValidateAllObjectFunc, &metav1.DeleteOptions{}, &metainternalversion.ListOptions{}); err != nil {
			return nil, false, fmt.Errorf("deleting the %s of namespace %s: %w", store.DefaultQualifiedResource, name, err)
		}
	}
	if err := r.deleteCustomResources(ctx, name); err != nil {
		return nil, false, err
	}
	return r.resourceREST.Delete(ctx, name, deleteValidation, options)
}

func (r *namespaceREST) deleteCustomResources(ctx context.Context, namespace string) error {
	crds, err := apiextensionsclient.NewForConfig(r.loopback)
	if err != nil {
		return err
	}
	client, err := dynamic.NewForConfig(r.loopback)
	if err != nil {
		return err
	}
	list, err := crds.ApiextensionsV1().CustomResourceDefinitions().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing CRDs to empty namespace %s: %w", namespace, err)
	}
	for _, crd := range list.Items {
		if crd.Spec.Scope != apiextensionsv1.NamespaceScoped {
			continue
		}
		for _, v := range crd.Spec.Versions {
			if !v.Storage {
				continue
			}
			gvr := schema.GroupVersionResource{Group: crd.Spec.Group, Version: v.Name, Resource: crd.Spec.Names.Plural}
			err := client.Resource(gvr).Namespace(namespace).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
			if err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("deleting the %s of namespace %s: %w", gvr.GroupResource(), namespace, err)
			}
		}
	}
	return nil
}

// listCRDGroups keeps the plain /apis group list in step with the CRDs.
func listCRDGroups(hook genericapiserver.PostStartHookContext, server *genericapiserver.GenericAPIServer) error {
	client, err := apiextensionsclient.NewForConfig(hook.LoopbackClientConfig)
	if err != nil {
		return err
	}
	factory := apiextensionsinformers.NewSharedInformerFactory(client, 0)
	informer := factory.Apiextensions().V1().CustomResourceDefinitions()
	lister := informer.Lister()
	listed := map[string]bool{}
	sync := func() {
		crds, err := lister.List(labels.Everything())
		if err != nil {
			return
		}
		versions := map[string][]string{}
		for _, crd := range crds {
			for _, v := range crd.Spec.Versions {
				if v.Served {
					versions[crd.Spec.Group] = append(versions[crd.Spec.Group], v.Name)
				}
			}
		}
		for group, vs := range versions {
			server.DiscoveryGroupManager.AddGroup(apiGroup(group, vs))
			listed[group] = true
		}
		for group := range listed {
			if _, ok := versions[group]; !ok {
				server.DiscoveryGroupManager.RemoveGroup(group)
				delete(listed, group)
			}
		}
	}
	// One goroutine runs the handlers, so `listed` needs no lock.
	_, err = informer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { sync() },
		UpdateFunc: func(interface{}, interface{}) { sync() },
		DeleteFunc: func(interface{}) { sync() },
	})
	if err != nil {
		return err
	}
	factory.Start(hook.Done())
	return nil
}

// apiGroup is a discovery entry; the preferred version is the highest by Kubernetes'
// version order (v1 > v1beta1 > v1alpha3).
func apiGroup(name string, versions []string) metav1.APIGroup {
	sort.Slice(versions, func(i, j int) bool {
		return version.CompareKubeAwareVersionStrings(versions[i], versions[j]) > 0
	})
	g := metav1.APIGroup{Name: name}
	for _, v := range versions {
		g.Versions = append(g.Versions, metav1.GroupVersionForDiscovery{GroupVersion: name + "/" + v, Version: v})
	}
	if len(g.Versions) > 0 {
		g.PreferredVersion = g.Versions[0]
	}
	return g
}

// createSystemNamespaces creates default, kube-system, kube-public and kube-node-lease, as
// kube-apiserver does; the server reports ready only after they exist.
func createSystemNamespaces(hook genericapiserver.PostStartHookContext) error {
	client, err := corev1client.NewForConfig(hook.LoopbackClientConfig)
	if err != nil {
		return err
	}
	return wait.PollUntilContextTimeout(hook, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		for _, name := range []string{metav1.NamespaceDefault, metav1.NamespaceSystem, metav1.NamespacePublic, corev1.NamespaceNodeLease} {
			ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
			_, err := client.Namespaces().Create(ctx, ns, metav1.CreateOptions{})
			if err != nil && !apierrors.IsAlreadyExists(err) {
				klog.Infof("creating namespace %s: %v (retrying)", name, err)
				return false, nil
			}
		}
		return true, nil
	})
}

// noServices resolves no Service: conversion webhooks of CRDs are not supported.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("lb-test-apiserver resolves no services (%s/%s:%d): webhooks are not supported", namespace, name, port)
}
